"""Memory bounds of apply: quantized as read from a checkpoint; originals freed layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import policyinject as pi
from policyinject.checkpoint import SafetensorsSource
from policyinject.testing.presets import tiny_model
from policyinject.testing.random_weights import RandomSource, write_random_checkpoint


class LiveBytes:
    """Peak bytes of tensors a checkpoint source handed out that are still alive (storage weak references)."""

    def __init__(self) -> None:
        self.refs: list = []
        self.peak = 0

    def live(self) -> int:
        return sum(n for r, n in self.refs if not r.expired())

    def track(self, t: torch.Tensor) -> torch.Tensor:
        self.refs.append((StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        self.peak = max(self.peak, self.live())
        return t


def _track(monkeypatch, cls) -> LiveBytes:
    meter = LiveBytes()
    read = cls.read
    monkeypatch.setattr(cls, "read", lambda self, *a, **k: meter.track(read(self, *a, **k)))
    return meter


def _meta(layers: int = 4):
    model = tiny_model("llama", num_hidden_layers=layers, intermediate_size=256)
    with torch.device("meta"):
        return type(model)(model.config)


def _bounds(engine):
    """(bytes of 16/32-bit tensors in the final model outside quantized linears, one layer's float bytes)."""
    from policyinject.modules.quant_linear import QuantLinear

    quant = {id(t) for m in engine.module.modules() if isinstance(m, QuantLinear) for t in m.parameters()}
    quant |= {id(t) for m in engine.module.modules() if isinstance(m, QuantLinear) for t in m.buffers()}
    keep = sum(t.numel() * t.element_size() for t in engine.module.state_dict().values()
               if t.is_floating_point() and id(t) not in quant and t.element_size() >= 2)
    return keep


@pytest.mark.parametrize("bits", [8, 4])
def test_random_checkpoint_is_quantized_as_read(monkeypatch, bits):
    meta = _meta()
    layer_bytes = sum(p.numel() * 4 for p in meta.model.layers[0].parameters())
    full = sum(p.numel() * 4 for p in meta.parameters())
    meter = _track(monkeypatch, RandomSource)
    quant = {"enabled": True, "weight": {"num_bits": bits, "q_type": "symmetric"}}
    engine = pi.init_inference(meta, quant=quant, checkpoint={"type": "random", "seed": 0}, kernel_backend="torch")
    assert not [n for n, p in meta.named_parameters() if p.device.type == "meta"]
    keep = _bounds(engine)
    assert meter.peak <= keep + layer_bytes, (meter.peak, keep, layer_bytes)
    assert meter.peak < full * 0.6  # all linears alive in 32-bit at once would be the full model
    assert engine.plan.quantize.linears == 7 * 4
    assert torch.isfinite(engine(torch.tensor([[1, 2, 3]])).logits).all()


def test_sharded_checkpoint_host_memory_one_tensor_at_a_time(monkeypatch, tmp_path):
    meta = _meta()
    files = write_random_checkpoint(meta, str(tmp_path), seed=1, shard_bytes=200_000)
    assert len(set(files.values())) >= 3  # really sharded
    layer_bytes = sum(p.numel() * 4 for p in meta.model.layers[0].parameters())
    meter = _track(monkeypatch, SafetensorsSource)
    engine = pi.init_inference(meta, dtype="int8", checkpoint=str(tmp_path), kernel_backend="torch")
    assert meter.peak <= _bounds(engine) + layer_bytes
    # the same seeded tensors whether read from disk or made on the fly
    meta2 = _meta()
    ref = pi.init_inference(meta2, dtype="int8", checkpoint={"type": "random", "seed": 1}, kernel_backend="torch")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(engine(ids).logits, ref(ids).logits)


def test_kernel_injection_frees_each_original_layer_before_the_next(monkeypatch):
    from policyinject.modules.block import InjectedBlock

    model = tiny_model("llama", num_hidden_layers=4)
    originals = [StorageWeakRef(layer.self_attn.q_proj.weight.untyped_storage()) for layer in model.model.layers]
    alive_at_build = []
    build = InjectedBlock.build.__func__

    def tracking(cls, layer, *args, **kwargs):
        alive_at_build.append(sum(not r.expired() for r in originals))
        return build(cls, layer, *args, **kwargs)

    monkeypatch.setattr(InjectedBlock, "build", classmethod(tracking))
    pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, kernel_backend="torch")
    # building layer i: the fused copies of layers < i exist, their unfused originals are gone
    assert alive_at_build == [4, 3, 2, 1]


@pytest.mark.gpu
def test_build_peak_on_gpu_within_ten_percent_of_final():
    from policyinject.testing.presets import preset_model

    torch.cuda.empty_cache()
    model = preset_model("llama-3.2-1b", dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine = pi.init_inference(model, dtype="bf16", replace_with_kernel_inject=True)
    torch.cuda.synchronize()
    final = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    assert peak <= final * 1.10 + (64 << 20), (base, final, peak)
    del engine
