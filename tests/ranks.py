"""Several CPU processes joined by gloo on the loopback, for the distributed tests."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """`worker(rank, world, port, *args)` on `world` processes; a free loopback port."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, *args), nprocs=world)


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
