"""Import an optional dependency or stop with a message naming the extra that installs it.

Example:
    >>> require("json", "bench").__name__
    'json'
    >>> require("no_such_module_xyz", "bench")
    Traceback (most recent call last):
    ...
    SystemExit: this needs no_such_module_xyz, which is not installed: pip install 'policyinject[bench]'
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``; if it is not installed, ``SystemExit`` naming ``policyinject[extra]``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0] and exc.name != module:
            raise
        raise SystemExit(f"this needs {module}, which is not installed: pip install 'policyinject[{extra}]'") from None
