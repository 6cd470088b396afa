"""What a forked child lets go of: the objects of its parent that hold locks.

flock and OFD locks belong to the open file, which a child forked by a process that has
the log open shares with it: the child's copy of a descriptor would keep a lock after
its parent died holding it, for as long as the child lives (a web server's master that
preloads the app and forks its workers). A child closes such copies at the fork, and
only closes them: an unlock would drop the parent's lock.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

_T = TypeVar("_T")


class ForgetInChild(Generic[_T]):
    """The live objects of one kind, and what a forked child does to each of them."""

    def __init__(self, forget: Callable[[_T], None]) -> None:
        self._items: weakref.WeakSet[_T] = weakref.WeakSet()
        self._forget = forget
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._in_child)

    def add(self, item: _T) -> None:
        self._items.add(item)

    def discard(self, item: _T) -> None:
        """Closed: its descriptor numbers may soon be another file's, never to close."""
        self._items.discard(item)

    def _in_child(self) -> None:
        for item in list(self._items):
            with contextlib.suppress(Exception):  # one half-made must not spare the others
                self._forget(item)
