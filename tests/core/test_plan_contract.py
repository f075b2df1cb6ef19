"""The typed plan contract: passes exchange typed plan fields, the pass list is static, every policy is
resolved before any pass, and ``plan_inference`` returns the typed plan."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import policyinject as pi
from policyinject.passes.base import Pass
from policyinject.passes.cuda_graph import CudaGraphPass
from policyinject.passes.dtype import DtypePass
from policyinject.passes.kernel_inject import KernelInjectPass
from policyinject.passes.quantize import QuantizePass
from policyinject.passes.tensor_parallel import TensorParallelPass
from policyinject.pipeline import PASSES, enabled_passes, prepare
from policyinject.plan import Plan
from policyinject.plan_fields import QuantizeSummary, TensorParallelLayout
from policyinject._plugin_manager import PluginManager
from policyinject.policy.resolved import ResolvedBy


class Block(nn.Module):
    def __init__(self, h: int = 64, i: int = 96) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_pass_tuple_is_static_and_enabled_is_the_one_switch():
    assert PASSES == (DtypePass, TensorParallelPass, QuantizePass, KernelInjectPass, CudaGraphPass)
    assert all(issubclass(p, Pass) for p in PASSES)
    cfg = pi.load_config(None)
    assert [p.name for p in enabled_passes(cfg)] == ["dtype"]
    cfg = pi.load_config(None, dtype="int8", replace_with_kernel_inject=True, tensor_parallel={"tp_size": 2})
    assert [p.name for p in enabled_passes(cfg)] == ["dtype", "tensor_parallel", "quantize", "kernel_inject"]
    assert [type(p) for p in enabled_passes(cfg)] == [p for p in PASSES if p.enabled(cfg)]
    off = pi.load_config(None, quant={"enabled": True, "weight": {"enabled": False}})
    assert not QuantizePass.enabled(off) and QuantizePass not in [type(p) for p in enabled_passes(off)]


def test_quantize_under_tensor_parallelism_reads_the_layout_local_shapes():
    """tp_grain_size=32 splits 96 features 64 | 32: an even-split guess (48) would size scales and bytes wrong."""
    model = Net(1)
    cfg = pi.load_config(None, dtype="int8", kernel_backend="torch",
                         tensor_parallel={"tp_size": 2, "tp_grain_size": 32}, injection_policy={Block: ("fc2",)})
    planned = prepare(model, cfg, PluginManager.empty())
    plan = planned.plan
    layout = plan.tensor_parallel
    assert isinstance(layout, TensorParallelLayout) and layout.tp_size == 2 and layout.rank == 0
    assert layout.local_shapes == {"layers.0.fc1": (64, 64), "layers.0.fc2": (64, 64)}
    quant = {a.path: a for a in plan.for_pass("quantize") if a.action == "quantize"}
    assert quant["layers.0.fc1"].details["local"] == [64, 64]  # not the even guess [48, 64]
    assert quant["layers.0.fc2"].details["local"] == [64, 64]  # not [64, 48]
    size = 4  # fp32 on the CPU
    assert quant["layers.0.fc1"].details["bytes_before"] == 64 * 64 * size
    assert isinstance(plan.quantize, QuantizeSummary) and plan.quantize.planned and plan.quantize.linears == 2
    assert plan.quantize.linear_bytes_before == 2 * 64 * 64 * size


def test_every_pass_sees_the_layers_autotp_heuristics_resolve():
    model = Net(2)
    cfg = pi.load_config(None, dtype="int8", kernel_backend="torch", replace_with_kernel_inject=True,
                         tensor_parallel={"tp_size": 2, "tp_grain_size": 32})
    planned = prepare(model, cfg, PluginManager.empty())
    plan, ctx = planned.plan, planned.context
    assert [(m.path, m.resolved_by) for m in plan.layers] == [("layers.0", ResolvedBy.HEURISTIC),
                                                              ("layers.1", ResolvedBy.HEURISTIC)]
    assert ctx.layers == plan.layers
    tp = {a.path: a.action for a in plan.for_pass("tensor_parallel") if "style" in a.details}
    assert tp == {"layers.0.fc1": "column", "layers.0.fc2": "row", "layers.1.fc1": "column", "layers.1.fc2": "row"}
    assert {a.path for a in plan.for_pass("quantize") if a.action == "quantize"} == set(tp)
    assert {a.path: a.action for a in plan.for_pass("kernel_inject")} == {"layers.0": "keep", "layers.1": "keep"}
    # without tensor parallelism, no heuristics: the layers stay unresolved, and int8 quantizes every linear of
    # the model no policy covers except its output head (here its last linear)
    plain = prepare(Net(2), pi.load_config(None, dtype="int8"), PluginManager.empty()).plan
    assert plain.layers == []
    assert [a.path for a in plain.for_pass("quantize")] == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1"]
    assert list(plain.quantize.skipped) == ["layers.1.fc2"] and "output head" in plain.quantize.skipped["layers.1.fc2"]


def test_plan_inference_returns_the_typed_plan_unchanged_model():
    model = Net(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = pi.plan_inference(model, dtype="int8", kernel_backend="torch", injection_policy={Block: ("fc2",)},
                             plugins=PluginManager.empty())
    assert isinstance(plan, Plan)
    assert [m.resolved_by for m in plan.layers] == [ResolvedBy.USER, ResolvedBy.USER]
    assert plan.dtype == torch.float32 and plan.tensor_parallel is None and plan.decode is None
    assert plan.quantize.linears == 4
    data = json.loads(json.dumps(plan.to_json()))
    assert data["layers"][0] == {"path": "layers.0", "class": "Block", "policy": "Block",
                                 "source": "injection_policy", "resolved_by": "injection_policy"}
    assert data["quantize"]["linears"] == 4 and data["dtype"] == "float32"
    assert "quantize" in plan.to_table()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is nn.Linear for b in model.layers for m in (b.fc1, b.fc2))


def test_action_payloads_are_attrs_instances():
    import attrs

    model = Net(1)
    planned = prepare(model, pi.load_config(None, dtype="int8", kernel_backend="torch",
                                            injection_policy={Block: ("fc2",)}), PluginManager.empty())
    payloads = [a.payload for a in planned.plan.actions if a.payload is not None]
    assert payloads and all(attrs.has(type(p)) for p in payloads)


def test_engine_report_comes_from_the_typed_fields():
    model = Net(1)
    engine = pi.init_inference(model, dtype="int8", kernel_backend="torch", injection_policy={Block: ("fc2",)},
                               plugins=PluginManager.empty())
    report = engine.report
    assert report["quantize"]["planned"] is False and report["quantize"]["linears"] == 2
    assert report["quantize"]["ratio"] < 0.5
    assert report["dtype"] == "float32" and report["parameter_bytes"] > 0
    assert "notes" not in report and not hasattr(engine, "_context")


def test_resolution_errors_name_the_layer_before_any_pass():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    model = nn.Module()
    model.layers = nn.ModuleList([Odd()])
    from policyinject.errors import PlanError

    with pytest.raises(PlanError, match=r"layers.0 \(Odd\).*none of its linears"):
        prepare(model, pi.load_config(None, tensor_parallel={"tp_size": 2}), PluginManager.empty())
