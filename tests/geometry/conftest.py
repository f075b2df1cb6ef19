"""Fixtures of the geometry tests: the config-less example plugin, installed through pip into a temporary
directory and put on ``sys.path`` (so it is found through its ``policyinject`` entry point, as a user's
installed plugin is)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BARE = ROOT / "examples" / "policyinject-example-bare"


@pytest.fixture(scope="session")
def bare_plugin(tmp_path_factory):
    """The ``policyinject-example-bare`` distribution installed (pip, no index, no dependencies)."""
    target = tmp_path_factory.mktemp("bare_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(BARE)], check=True)
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("policyinject_example_bare")]:
        del sys.modules[name]
