"""Hooks attached all or none: a kind that hooks many UNet layers and fails half-way (a layer of another base model,
an interrupt) must leave the UNet as it found it."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional


@contextlib.contextmanager
def removed_on_error(handles: list, on_error: Optional[Callable[[], None]] = None):
    """Hooks registered in the block go into `handles`; when the block raises, every one of them is removed (and
    `on_error` runs) before the error goes on."""
    try:
        yield handles
    except BaseException:
        for handle in handles:
            handle.remove()
        if on_error is not None:
            on_error()
        raise
