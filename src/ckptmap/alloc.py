"""Passes that make many objects and free none: the cyclic garbage collector paused."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic collector paused: planning and header parsing allocate a few objects
    per key and free none of them, and with 100k keys the collector would rescan the
    growing heap again and again for nothing (a third of a header's parse).

    On the way out everything made meanwhile is moved to the oldest generation (freeze,
    then unfreeze: two list splices) rather than left young, where the first collection
    after re-enabling would walk all of it at once. Skipped when the caller has frozen
    objects of its own: unfreezing would release them.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()
