"""Several CPU processes joined by gloo on the loopback, for the distributed tests."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """`worker(rank, world, port, *args)` on `world` processes; a free loopback port."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_main, args=(worker, world, port, args), nprocs=world)


def _main(rank: int, worker: Callable[..., None], world: int, port: int, args: tuple) -> None:
    """One rank: the worker, then out at once. Left to run, interpreter shutdown sometimes
    aborts in torch's own teardown ("terminate called without an active exception", a
    gloo thread still joinable after `destroy_process_group`), about one run in twenty
    on 3 ranks here; the worker's results are written by then."""
    worker(rank, world, port, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def gloo(rank: int, world: int, port: int) -> Iterator[None]:
    """This process in the group; every rank meets at a barrier before gloo is torn down."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
