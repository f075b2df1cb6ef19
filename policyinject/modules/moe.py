"""Injected sparse mixture-of-experts block, built from a :class:`~policyinject.policy.moe.MoESpec`.

:class:`InjectedMoE` replaces a Hugging Face MoE block (Mixtral ``MixtralSparseMoeBlock``, Qwen2-MoE
``Qwen2MoeSparseMoeBlock`` with its sigmoid-gated shared expert, Qwen3-MoE, OLMoE, GPT-OSS ``GptOssMLP``):
router logits, top-k routing on the device (:func:`policyinject.kernels.moe.route`), the routed experts on the
fused MoE kernel (:func:`policyinject.kernels.moe.fused_moe`), the shared expert on
:class:`~policyinject.modules.mlp.InjectedMLP`. Its forward takes and returns what the replaced block does.

Expert weights are held in the kernel's canonical layout (``w13 [E, 2I, H]`` gate rows then up rows,
``w2 [E, H, I]``). transformers 5's fused ``gate_up_proj``/``down_proj`` already are: the block's own
parameters are shared, not copied. Transposed (GPT-OSS ``[E, H, 2I]``), interleaved gate|up, or per-expert
linears (``ModuleList``) are converted once at build time into new parameters.

On the PyTorch path, ``dispatch="auto"`` runs each expert on its own tokens on a CPU (one host read of the
per-expert counts) and the sync-free dense form on CUDA and under ``torch.compile`` (CUDA-graph safe).

Example:
    >>> import torch
    >>> from policyinject.testing.presets import tiny_model
    >>> from policyinject_plugins.mixtral import MIXTRAL_MOE
    >>> model = tiny_model("mixtral")
    >>> block = model.model.layers[0].mlp
    >>> moe = InjectedMoE.build(block, MIXTRAL_MOE, model.config, backend="torch")
    >>> x = torch.randn(1, 5, 64)
    >>> torch.allclose(moe(x), block(x), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import PolicyError
from ..kernels import moe as moe_kernels
from ..kernels._common import use_triton
from ..policy.moe import ExpertsLayout, GateUpOrder, MoESpec
from .mlp import InjectedMLP

__all__ = ["InjectedMoE", "inject_moe"]


def _get(root: torch.nn.Module, path: str, what: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        raise PolicyError(f"{what}: {type(root).__name__} has no submodule {path!r}") from None


def _param(module: torch.nn.Module, name: str, what: str) -> torch.Tensor:
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise PolicyError(f"{what}: {type(module).__name__} has no tensor attribute {name!r}")
    return value


def _number(source: Any, module: torch.nn.Module, model_config: Any, what: str) -> float:
    if isinstance(source, (int, float)) and not isinstance(source, bool):
        return float(source)
    for holder in (module, model_config):
        if holder is not None and getattr(holder, source, None) is not None:
            return float(getattr(holder, source))
    raise PolicyError(f"{what}: neither {type(module).__name__} nor the model config has {source!r}")


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[g0, u0, g1, u1, ...]`` along ``dim`` -> ``[g0, g1, ... | u0, u1, ...]``."""
    idx = torch.arange(t.shape[dim], device=t.device)
    return torch.cat([t.index_select(dim, idx[0::2]), t.index_select(dim, idx[1::2])], dim=dim)


def _as_param(t: torch.Tensor) -> torch.nn.Parameter:
    return t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t.detach().contiguous(), requires_grad=False)


def _expert_weights(experts: torch.nn.Module, spec: Any, num_experts: int) -> Tuple[torch.Tensor, ...]:
    """``(w13, w2, b13, b2)`` in the canonical layout (sharing the module's parameters where it already is)."""
    layout = ExpertsLayout(spec.layout)
    what = f"ExpertsSpec({spec.module!r})"
    if layout is ExpertsLayout.MODULE_LIST:
        if not isinstance(experts, torch.nn.ModuleList) or len(experts) != num_experts:
            raise PolicyError(f"{what}: expected a ModuleList of {num_experts} experts, got {type(experts).__name__}")
        names = ([spec.gate] if spec.gated else []) + [spec.up]
        w13 = torch.stack([torch.cat([_param(_get(ex, n, what), "weight", what) for n in names]) for ex in experts])
        w2 = torch.stack([_param(_get(ex, spec.down, what), "weight", what) for ex in experts])
        biases = [[getattr(_get(ex, n, what), "bias", None) for n in names] for ex in experts]
        b13 = None if biases[0][0] is None else torch.stack([torch.cat(b) for b in biases])
        b2s = [getattr(_get(ex, spec.down, what), "bias", None) for ex in experts]
        b2 = None if b2s[0] is None else torch.stack(b2s)
        return w13, w2, b13, b2
    w13 = _param(experts, spec.gate_up if spec.gated else spec.up, what)
    w2 = _param(experts, spec.down, what)
    b13 = None if spec.gate_up_bias is None else _param(experts, spec.gate_up_bias, what)
    b2 = None if spec.down_bias is None else _param(experts, spec.down_bias, what)
    if layout is ExpertsLayout.FUSED_TRANSPOSED:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if spec.gated and GateUpOrder(spec.order) is GateUpOrder.INTERLEAVED:
        w13 = _deinterleave(w13, 1)
        b13 = None if b13 is None else _deinterleave(b13, 1)
    return w13, w2, b13, b2


class InjectedMoE(torch.nn.Module):
    """Router, top-k routing, fused routed experts and an optional gated shared expert."""

    def __init__(self, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor], w13: torch.Tensor,
                 w2: torch.Tensor, b13: Optional[torch.Tensor], b2: Optional[torch.Tensor], *, top_k: int,
                 order: str, normalize: bool, weights_dtype: str, activation: str, gated: bool,
                 alpha: float = 1.702, limit: float = 7.0, shared: Optional[torch.nn.Module] = None,
                 shared_gate: Optional[torch.nn.Module] = None, returns_router_scores: bool = False,
                 backend: str = "auto", dispatch: str = "auto") -> None:
        super().__init__()
        num_experts, rows, hidden = w13.shape
        inter = w2.shape[-1]
        if router_weight.shape != (num_experts, hidden) or w2.shape != (num_experts, hidden, inter) \
                or rows != (2 * inter if gated else inter):
            raise PolicyError(
                f"MoE weights do not fit together: router {tuple(router_weight.shape)}, w13 {tuple(w13.shape)}, "
                f"w2 {tuple(w2.shape)} ({'gated' if gated else 'plain'} experts)")
        self.router_weight = _as_param(router_weight)
        self.router_bias = None if router_bias is None else _as_param(router_bias)
        self.w13, self.w2 = _as_param(w13), _as_param(w2)
        self.b13 = None if b13 is None else _as_param(b13)
        self.b2 = None if b2 is None else _as_param(b2)
        self.num_experts, self.top_k = num_experts, int(top_k)
        self.order, self.normalize, self.weights_dtype = order, bool(normalize), weights_dtype
        self.activation, self.gated, self.alpha, self.limit = activation, bool(gated), float(alpha), float(limit)
        self.shared, self.shared_gate = shared, shared_gate
        self.returns_router_scores = bool(returns_router_scores)
        self.backend, self.dispatch = backend, dispatch
        #: name -> (num_bits, group_size, in_features) of the expert weights quantized by quantize_experts
        self._quantized: dict = {}

    def quantize_experts(self, num_bits: int = 8, group_size: Any = None, symmetric: bool = True) -> None:
        """Replace the float expert weights by int8/int4 ones (the format of
        :mod:`policyinject.kernels.quantize`, per expert); the router and the shared expert stay as they are.
        ``group_size``: one size for both weights, or a mapping ``{"w13": g, "w2": g}`` (None: the default
        of :func:`~policyinject.kernels.quantize.quantize_weight`).

        Example:
            >>> m = InjectedMoE(torch.randn(4, 32), None, torch.randn(4, 16, 32), torch.randn(4, 32, 8), None, None,
            ...                 top_k=2, order="softmax_topk", normalize=True, weights_dtype="input",
            ...                 activation="silu", gated=True, backend="torch")
            >>> m.quantize_experts(4, group_size=8)
            >>> m.experts_weight("w13").qweight.shape, m(torch.randn(3, 32)).shape
            (torch.Size([4, 16, 16]), torch.Size([3, 32]))
        """
        for name in ("w13", "w2"):
            if name in self._quantized:
                raise PolicyError(f"InjectedMoE: {name} is already quantized")
            group = group_size.get(name) if isinstance(group_size, dict) else group_size
            q = moe_kernels.quantize_experts(getattr(self, name).detach(), num_bits, group, symmetric)
            delattr(self, name)
            self.register_buffer(f"{name}_qweight", q.qweight)
            self.register_buffer(f"{name}_scales", q.scales)
            self.register_buffer(f"{name}_zeros", q.zeros)
            self._quantized[name] = (q.num_bits, q.group_size, q.in_features)

    def experts_weight(self, name: str) -> Union[torch.Tensor, "moe_kernels.QuantizedExperts"]:
        """``w13`` or ``w2``: the float parameter, or the :class:`~policyinject.kernels.moe.QuantizedExperts`."""
        if name not in self._quantized:
            return getattr(self, name)
        bits, group, k = self._quantized[name]
        return moe_kernels.QuantizedExperts(getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scales"),
                                            getattr(self, f"{name}_zeros"), bits, group, k)

    @classmethod
    def build(cls, block: torch.nn.Module, spec: MoESpec, model_config: Any, backend: str = "auto",
              dispatch: str = "auto") -> "InjectedMoE":
        """Build from the HF MoE block (the layer's submodule at ``spec.module``) and the model config."""
        if not spec.matches(block):
            raise PolicyError(f"MoESpec for {spec.block_name} given a {type(block).__name__}")
        rs = spec.router
        resolved = rs.resolve(model_config)
        router = _get(block, rs.module, f"RouterSpec({rs.module!r})")
        weight = _param(router, rs.weight, f"RouterSpec({rs.module!r})")
        if rs.bias is None:
            if isinstance(getattr(router, "bias", None), torch.Tensor):
                raise PolicyError(f"RouterSpec({rs.module!r}): {type(router).__name__} has a bias; name it in "
                                  "RouterSpec.bias")
            bias = None
        else:
            bias = _param(router, rs.bias, f"RouterSpec({rs.module!r})")
        es = spec.experts
        experts = _get(block, es.module, f"ExpertsSpec({es.module!r})")
        w13, w2, b13, b2 = _expert_weights(experts, es, resolved.num_experts)
        act = getattr(es.activation, "value", es.activation)
        alpha = limit = 0.0
        if act == "swiglu_clamped":
            alpha = _number(es.alpha, experts, model_config, "ExpertsSpec.alpha")
            limit = _number(es.limit, experts, model_config, "ExpertsSpec.limit")
        shared = shared_gate = None
        if spec.shared is not None:
            shared = InjectedMLP.build(_get(block, spec.shared.module, "MoESpec.shared"), spec.shared, backend)
        if spec.shared_gate is not None:
            shared_gate = _get(block, spec.shared_gate, "MoESpec.shared_gate")
        return cls(weight, bias, w13, w2, b13, b2, top_k=resolved.top_k, order=rs.order.value,
                   normalize=resolved.normalize, weights_dtype=rs.weights_dtype, activation=act, gated=es.gated,
                   alpha=alpha, limit=limit, shared=shared, shared_gate=shared_gate,
                   returns_router_scores=spec.returns_router_scores, backend=backend, dispatch=dispatch)

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [T, E], weights [T, k], ids [T, k])`` for ``x [T, H]``; no host sync."""
        logits = F.linear(x, self.router_weight, self.router_bias)
        if use_triton(self.backend, logits):  # one fused launch; float32 weights already rounded to the dtype
            weights, ids = moe_kernels.route_fused(logits, self.top_k, self.order, self.normalize,
                                                   round_to=logits.dtype if self._weights_in_input_dtype else None,
                                                   backend=self.backend)
            return logits, weights, ids
        weights, ids = moe_kernels.route(logits, self.top_k, self.order, self.normalize)
        return logits, self.router_scores(weights, logits), ids

    @property
    def _weights_in_input_dtype(self) -> bool:
        """Whether the model keeps its routing weights in its own dtype (rounded from float32)."""
        return self.weights_dtype == "input" or self.order == "topk_softmax"

    def router_scores(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The routing weights as the Hugging Face block returns them (in the input's dtype when the model
        keeps them there; :meth:`route` may hand them over as float32 already rounded)."""
        if self._weights_in_input_dtype and weights.dtype != x.dtype:
            return weights.to(x.dtype)
        return weights

    def _dispatch(self, x: torch.Tensor) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        if x.device.type == "cuda" or torch.compiler.is_compiling():
            return "dense"
        return "grouped"

    def forward(self, hidden_states: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.route(x)
        out = moe_kernels.fused_moe(
            x, self.experts_weight("w13"), self.experts_weight("w2"), ids, weights, self.activation, gated=self.gated, b13=self.b13, b2=self.b2,
            alpha=self.alpha, limit=self.limit, backend=self.backend, dispatch=self._dispatch(x))
        out = self.add_shared(x, out).reshape(shape)
        return (out, self.router_scores(weights, x)) if self.returns_router_scores else out

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the shared experts' output on ``x`` (gated by ``sigmoid(shared_gate(x))`` when the
        block has a shared gate); ``out`` unchanged for a block without shared experts."""
        if self.shared is None:
            return out
        s = self.shared(x)
        if self.shared_gate is not None:
            s = torch.sigmoid(self.shared_gate(x)) * s
        return out + s

    def extra_repr(self) -> str:
        e, _, h = self.experts_weight("w13").shape
        quant = "".join(f", {n}=int{b}" for n, (b, _, _) in self._quantized.items())
        return (f"experts={e}, top_k={self.top_k}, hidden={h}, intermediate={self.experts_weight('w2').shape[-1]}"
                f"{quant}, "
                f"{'gated ' if self.gated else ''}{self.activation}, order={self.order}, "
                f"normalize={self.normalize}, backend={self.backend}")


def inject_moe(model: torch.nn.Module, spec: MoESpec, model_config: Any = None, backend: str = "auto",
               dispatch: str = "auto") -> List[str]:
    """Replace every module of ``spec.block``'s class in ``model`` by an :class:`InjectedMoE`; returns their paths.

    ``model_config`` defaults to ``model.config``. Raises :class:`PolicyError` when no module matches.

    Example:
        >>> from policyinject.testing.presets import tiny_model
        >>> from policyinject_plugins.mixtral import MIXTRAL_MOE
        >>> inject_moe(tiny_model("mixtral"), MIXTRAL_MOE, backend="torch")
        ['model.layers.0.mlp', 'model.layers.1.mlp']
    """
    config = model_config if model_config is not None else getattr(model, "config", None)
    targets = [(name, mod) for name, mod in model.named_modules() if name and spec.matches(mod)]
    if not targets:
        raise PolicyError(f"no {spec.block_name} module in {type(model).__name__}")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, InjectedMoE.build(mod, spec, config, backend, dispatch))
    return [name for name, _ in targets]
