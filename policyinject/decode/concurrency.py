"""The per-object call lock that serialises ``generate`` calls on one engine / decoder.

A decoder keeps one KV cache and one set of state buffers per batch size; two calls running at once would
write each other's slots. :class:`CallLock` is a plain ``threading.Lock`` owned by the object it protects
(no process-wide state); it copies and pickles as a fresh, unlocked lock, so ``copy.deepcopy`` of an engine
keeps working. A call from the thread that already holds it (``generate`` from inside ``generate``: a
streamer's ``put`` generating again) would wait for itself forever; it raises
:class:`~policyinject.errors.UnsupportedError` instead. Other threads wait their turn.

Example:
    >>> import copy
    >>> lock = CallLock()
    >>> with lock:
    ...     lock.locked()
    True
    >>> copy.deepcopy(lock).locked(), lock.locked()
    (False, False)
    >>> with lock:
    ...     with lock:
    ...         pass
    Traceback (most recent call last):
    ...
    policyinject.errors.UnsupportedError: generate was called from inside a generate call on the same engine, in the same thread (a streamer or callback that generates again?): the engine's cache and state are in use, and waiting would never end. Generate after the outer call returns, or on another engine
"""

from __future__ import annotations

import threading
from typing import Any, Optional

__all__ = ["CallLock"]


class CallLock:
    """A ``threading.Lock`` that deep-copies and pickles as a new lock; see the module docstring."""

    __slots__ = ("_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None  # ident of the thread holding the lock (only it sets its own ident)

    def __enter__(self) -> "CallLock":
        me = threading.get_ident()
        if self._owner == me:
            from ..errors import UnsupportedError

            raise UnsupportedError(
                "generate was called from inside a generate call on the same engine, in the same thread (a "
                "streamer or callback that generates again?): the engine's cache and state are in use, and "
                "waiting would never end. Generate after the outer call returns, or on another engine")
        self._lock.acquire()
        self._owner = me
        return self

    def __exit__(self, *exc: Any) -> None:
        self._owner = None
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
        self._owner = None
