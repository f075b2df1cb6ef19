"""The installed package is whole and its public surface is curated: the wheel's package list, the two API
tiers, the one base error, optional extras named when missing. (CI also installs the built wheel into a
fresh venv and runs the CLI from outside the checkout: scripts/wheel_check.sh.)"""

from __future__ import annotations

import importlib
import runpy
import tomllib
import types
from pathlib import Path

import pytest

import policyinject as pi

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "policyinject").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert "policyinject_plugins" in listed and setuptools["package-dir"]["policyinject_plugins"] == "plugins"


def test_all_is_the_two_tiers_and_nothing_else_is_public():
    assert pi.__all__ == list(pi._USER_API + pi._AUTHOR_API)
    assert len(set(pi.__all__)) == len(pi.__all__)
    for name in ("init_inference", "InferenceEngine", "plan_inference", "Plan", "load_config", "InferenceConfig",
                 "PolicyInjectError", "Policy", "ModelPolicy", "AttentionSpec", "Style", "hookimpl"):
        assert name in pi.__all__
    public = {n for n, v in vars(pi).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(pi.__all__), "a public name outside __all__ (or a name in __all__ that is missing)"


def test_one_base_error():
    for cls in (pi.ConfigError, pi.PlanError, pi.PolicyError, pi.PluginError, pi.UnsupportedError):
        assert issubclass(cls, pi.PolicyInjectError)
    with pytest.raises(pi.PolicyInjectError):
        pi.load_config({"tensor_paralel": {"tp_size": 2}})
    assert issubclass(pi.PluginConflictWarning, UserWarning)


def test_test_helpers_live_in_policyinject_testing():
    for old in ("policyinject.presets", "policyinject.models", "policyinject.roofline", "policyinject.plugins"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    from policyinject.testing import models, presets, roofline  # noqa: F401


def test_a_missing_extra_is_named():
    from policyinject._extras import require

    with pytest.raises(SystemExit, match=r"pip install 'policyinject\[bench\]'"):
        require("surely_not_installed_module", "bench")


def test_bench_comes_from_the_package_and_the_script_is_a_wrapper(capsys):
    from policyinject.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--preset" in capsys.readouterr().out
    script = runpy.run_path(str(ROOT / "benchmarks" / "decode.py"), run_name="not_main")
    from policyinject.bench import decode

    assert script["run"] is decode.run and script["ALL_CONFIGS"] == decode.ALL_CONFIGS


@pytest.mark.slow
def test_bench_runs_a_tiny_model_on_the_cpu(tmp_path):
    import json

    from policyinject.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny:llama", "--device", "cpu", "--dtype", "fp32", "--configs", "kernels",
                 "--batch", "1", "--prompt", "4", "--new", "3", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    batch1 = result["presets"]["tiny:llama"]["systems"]["kernels"]["batches"]["1"]
    assert batch1["prefill_ms"] > 0 and batch1["ms_per_token"] >= 0  # a difference of two timings
