"""The per-object call lock that serialises ``generate`` calls on one engine / decoder.

A decoder keeps one KV cache and one set of state buffers per batch size; two calls running at once would
write each other's slots. :class:`CallLock` is a plain ``threading.Lock`` owned by the object it protects
(no process-wide state); it copies and pickles as a fresh, unlocked lock, so ``copy.deepcopy`` of an engine
keeps working.

Example:
    >>> import copy
    >>> lock = CallLock()
    >>> with lock:
    ...     lock.locked()
    True
    >>> copy.deepcopy(lock).locked(), lock.locked()
    (False, False)
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["CallLock"]


class CallLock:
    """A ``threading.Lock`` that deep-copies and pickles as a new lock; see the module docstring."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> "CallLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def locked(self) -> bool:
        """Whether a call holds the lock now."""
        return self._lock.locked()

    def __deepcopy__(self, memo: dict) -> "CallLock":
        return CallLock()

    def __copy__(self) -> "CallLock":
        return CallLock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
