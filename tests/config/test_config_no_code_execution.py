"""Validation runs no user code: an ``injection_policy`` key written as a name is never imported.

A module planted next to the config (and on ``sys.path``) writes a marker file when imported. Neither
``load_config``, ``policyinject config check`` (in process and in a real process) nor ``init_inference``
imports it, and the policy still applies to the model's class of that name, matched at plan time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import policyinject as pi
from policyinject.cli import main
from policyinject.config import ClassRef, load_config
from policyinject.config.class_ref import resolve_injection_policy, resolve_ref
from policyinject.errors import PolicyError


def _block_class(module: str, name: str = "Block") -> type:
    """A layer class whose qualified name is ``module.name``, made without importing ``module``."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))

    return type(name, (torch.nn.Module,), {"__init__": __init__, "forward": forward, "__module__": module,
                                           "__qualname__": name})


class Net(torch.nn.Module):
    def __init__(self, block: type, n: int = 2):
        super().__init__()
        self.layers = torch.nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A directory on sys.path (and the cwd) holding evil_mod.py and a config that names evil_mod.Block."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_mod.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("evil_mod was imported")
        import torch
        class Block(torch.nn.Module):
            pass
    """))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"injection_policy": {"evil_mod.Block": ["fc2"]}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    yield config, marker
    assert "evil_mod" not in sys.modules


def test_load_config_imports_nothing(planted):
    config, marker = planted
    cfg = load_config(config)
    assert cfg.injection_policy == {ClassRef("evil_mod.Block"): ("fc2",)}
    assert cfg.to_dict()["injection_policy"] == {"evil_mod.Block": ["fc2"]}
    assert not marker.exists()


def test_config_check_imports_nothing_in_process(planted, capsys):
    config, marker = planted
    assert main(["config", "check", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["injection_policy"] == {"evil_mod.Block": ["fc2"]}
    assert not marker.exists()


def test_config_check_imports_nothing_in_a_real_process(planted):
    config, marker = planted
    run = subprocess.run([sys.executable, "-m", "policyinject.cli", "config", "check", str(config)],
                         cwd=str(config.parent), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert not marker.exists()


def test_init_inference_imports_nothing_and_the_policy_applies(planted):
    config, marker = planted
    block = _block_class("evil_mod")
    model = Net(block)
    ctx = pi.plan_inference(model, load_config(config))
    assert [m.path for m in ctx.layers] == ["layers.0", "layers.1"]
    assert {m.policy.source for m in ctx.layers} == {"injection_policy"}
    assert all(m.policy.layer is block for m in ctx.layers)
    styles, _, _ = ctx.layers[0].policy.styles_for(ctx.layers[0].module)
    assert {k: v.value for k, v in styles.items()} == {"fc1": "column", "fc2": "row"}
    x = torch.randn(2, 8)
    expected = model(x)
    engine = pi.init_inference(model, config=str(config))
    assert torch.allclose(engine(x), expected)
    assert not marker.exists()


def test_a_name_matching_no_class_is_a_policy_error_naming_the_key(planted):
    config, marker = planted
    model = Net(_block_class("evil_mod"))
    with pytest.raises(PolicyError) as e:
        pi.plan_inference(model, load_config(injection_policy={"evil_mod.Blok": "fc2"}))
    assert "injection_policy['evil_mod.Blok']" in str(e.value) and "evil_mod.Block" in str(e.value)
    before = [type(m) for m in model.modules()]
    with pytest.raises(PolicyError):
        pi.init_inference(model, injection_policy={"evil_mod.Blok": "fc2"})
    assert [type(m) for m in model.modules()] == before
    assert not marker.exists()


def test_re_exported_names_match_like_the_import_did():
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16)
    model = torch.nn.Sequential(layer)
    pairs = resolve_injection_policy({ClassRef("torch.nn.TransformerEncoderLayer"): ("linear2",)}, model)
    assert pairs == [(torch.nn.TransformerEncoderLayer, ("linear2",))]
    exact = ClassRef("torch.nn.modules.transformer.TransformerEncoderLayer")
    assert resolve_ref(exact, [torch.nn.TransformerEncoderLayer]) is torch.nn.TransformerEncoderLayer
    assert not ClassRef("torch.nn.modules.transformer.Linear").matches(torch.nn.Linear)
    assert not ClassRef("orch.nn.Linear").matches(torch.nn.Linear)


def test_ambiguous_and_repeated_names_are_errors():
    a, b = _block_class("pkg.one"), _block_class("pkg.two")
    with pytest.raises(PolicyError, match="several classes"):
        resolve_ref(ClassRef("pkg.Block"), [a, b])
    assert resolve_ref(ClassRef("pkg.one.Block"), [a, b]) is a
    model = torch.nn.Sequential(a())
    with pytest.raises(PolicyError, match="names pkg.one.Block, which"):
        resolve_injection_policy({ClassRef("pkg.Block"): ("fc2",), ClassRef("pkg.one.Block"): ("fc2",)}, model)


def test_policy_entry_for_a_name_is_checked_against_the_class_it_names():
    block = _block_class("mylib.blocks")
    model = Net(block)
    good = pi.Policy("mylib.blocks.Block", styles={"fc2": "row"})
    ctx = pi.plan_inference(model, load_config(injection_policy={"mylib.Block": good}))
    assert len(ctx.layers) == 2 and ctx.layers[0].policy.layer is block
    other = pi.Policy("mylib.Other", styles={"fc2": "row"})
    with pytest.raises(PolicyError, match="describes mylib.Other"):
        pi.plan_inference(model, load_config(injection_policy={"mylib.Block": other}))
