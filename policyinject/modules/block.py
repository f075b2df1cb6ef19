"""Injected transformer block: the whole layer on fused modules, residual adds fused into the norms.

:class:`InjectedBlock` replaces a layer whose policy gives a known wiring (:class:`~policyinject.policy.BlockKind`):

- ``pre_norm``  (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-2, OPT, NeoX sequential):
  ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` -- the first residual add is fused into ``norm2``;
- ``parallel`` (Falcon, Phi, NeoX): ``out = x + attn(norm1(x)) + mlp(norm2(x))`` (``norm2`` may be ``norm1``);
- ``post_norm`` (BERT, OPT-350m): ``h = norm1(x + attn(x)); out = norm2(h + mlp(h))`` -- both adds fused.

Two entry points (see ``docs/architecture.md``):

- ``forward(...)``: same arguments (positional or keyword) and same result shape as the replaced layer's
  ``forward`` in the installed transformers; reads ``position_embeddings``, ``attention_mask`` and the HF
  cache object (``cache``, ``past_key_values`` or ``layer_past``), which it updates as HF attention does;
- ``run(hidden, cos, sin, attend)``: the core for the decode engine; ``attend(q, k, v)`` receives q/k/v
  after rotary as ``[B, H, T, D]`` and returns ``[B, Hq, T, D]``.

Example:
    >>> import torch
    >>> from policyinject.testing.presets import tiny_model
    >>> from policyinject.modules.attention import sdpa
    >>> model = tiny_model("llama")
    >>> layer = model.model.layers[0]
    >>> from policyinject_plugins.llama import LLAMA_LAYER
    >>> block = InjectedBlock.build(layer, LLAMA_LAYER, num_heads=4, num_kv_heads=2, head_dim=16, backend="torch")
    >>> x = torch.randn(1, 5, 64)
    >>> pe = model.model.rotary_emb(x, torch.arange(5)[None])
    >>> torch.allclose(block(x, position_embeddings=pe), layer(x, position_embeddings=pe), atol=1e-5)
    True
    >>> attend = lambda q, k, v: sdpa(q, k, v, None)
    >>> torch.allclose(block.run(x, *pe, attend), layer(x, position_embeddings=pe), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from ..errors import PolicyError
from ..policy.model import BlockKind, NormKind, read_value
from ._hf import CallSignature, find_cache
from ._ops import make_norm
from .attention import InjectedAttention, _cache_kwargs, _rotary_tables
from .mlp import InjectedMLP

__all__ = ["InjectedBlock", "effective_block_kind", "norm_from_spec"]

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def effective_block_kind(policy: Any, layer: torch.nn.Module) -> BlockKind:
    """The policy's block kind, adjusted by the layer instance's own wiring flags.

    Hugging Face layers that switch wiring by config keep the switch on the instance: GPT-NeoX
    ``use_parallel_residual=False`` makes a ``parallel`` block sequential (``pre_norm``); OPT
    ``do_layer_norm_before=False`` (OPT-350m) makes a ``pre_norm`` block ``post_norm``.

    Example:
        >>> import torch
        >>> from policyinject.policy import Policy
        >>> layer = torch.nn.Module(); layer.do_layer_norm_before = False
        >>> effective_block_kind(Policy("x.Layer", block="pre_norm"), layer).value
        'post_norm'
    """
    kind = BlockKind(policy.block)
    if kind is BlockKind.PARALLEL and getattr(layer, "use_parallel_residual", True) is False:
        return BlockKind.PRE_NORM
    if kind is BlockKind.PRE_NORM and getattr(layer, "do_layer_norm_before", True) is False:
        return BlockKind.POST_NORM
    return kind


def norm_from_spec(root: torch.nn.Module, spec: Any, backend: str) -> torch.nn.Module:
    """The fused norm module for the norm a :class:`~policyinject.policy.NormSpec` names under ``root``."""
    module = root.get_submodule(spec.path)
    kind = "rms" if NormKind(spec.kind) is NormKind.RMS else "layer"
    return make_norm(module, kind, spec.weight_offset, spec.eps_attr, backend, default_eps=getattr(spec, "eps", None))


def _norm_spec(policy: Any, name: Optional[str]) -> Any:
    for spec in policy.norms:
        if spec.path == name:
            return spec
    raise PolicyError(f"policy for {policy.layer_name}: norm {name!r} is not among its norms "
                      f"{[s.path for s in policy.norms]}")


class InjectedBlock(torch.nn.Module):
    """A whole layer on fused modules; see the module docstring."""

    def __init__(self, attn: InjectedAttention, mlp: torch.nn.Module, norm1: Optional[torch.nn.Module],
                 norm2: Optional[torch.nn.Module], kind: BlockKind, signature: CallSignature,
                 backend: str = "auto", attn_out_norm: Optional[torch.nn.Module] = None,
                 mlp_out_norm: Optional[torch.nn.Module] = None, residual_scale: Optional[float] = None) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.norm1 = norm1
        self.norm2 = norm2
        #: Sandwich norms on the attention and MLP outputs (None: absent).
        self.attn_out_norm = attn_out_norm
        self.mlp_out_norm = mlp_out_norm
        #: Factor on each branch before its residual add (None: 1).
        self.residual_scale = float(residual_scale) if residual_scale is not None and residual_scale != 1.0 else None
        self.kind = BlockKind(kind)
        #: In :meth:`run_deferred`, let a decode GEMV fold the residual add and RMSNorm before it into its own
        #: kernel (one row on a GPU; see :meth:`InjectedAttention.run_normed`). Off by default until measured
        #: on a GPU (``benchmarks/norm_fusion.py`` compares both); True turns it on for this block.
        self.fuse_norms = False
        self.signature = signature
        self.backend = backend
        sandwich = attn_out_norm is not None or mlp_out_norm is not None
        if (sandwich or self.residual_scale is not None) and self.kind is not BlockKind.PRE_NORM:
            raise PolicyError(f"sandwich norms and residual_scale need a pre_norm block, not {self.kind.value}")
        if self.kind is not BlockKind.PARALLEL and not sandwich and (norm1 is None or norm2 is None):
            raise PolicyError(f"a {self.kind.value} block needs two norms")
        if self.kind is BlockKind.PARALLEL and norm1 is None:
            raise PolicyError("a parallel block needs an input norm")

    @property
    def layer_idx(self) -> Optional[int]:
        return self.attn.layer_idx

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.attn.head_dim

    @classmethod
    def build(cls, layer: torch.nn.Module, policy: Any, *, num_heads: int, num_kv_heads: int, head_dim: int,
              backend: str = "auto", model_config: Any = None,
              mlp_module: Optional[torch.nn.Module] = None) -> "InjectedBlock":
        """Build from a layer instance and its policy (the layer itself is not modified). ``model_config``
        (default: the layer's ``config``) is what value sources such as ``residual_scale`` read.
        ``mlp_module``: the module for the MLP slot, already built (an injected MoE block); otherwise the
        policy's MLP role is built."""
        kind = effective_block_kind(policy, layer)
        if kind is BlockKind.OPAQUE:
            raise PolicyError(f"policy for {policy.layer_name} has an opaque block; inject its submodules instead")
        cfg = model_config if model_config is not None else getattr(layer, "config", None)
        a = policy.attention
        first = policy.input_norm or policy.attention_output_norm
        offset = _norm_spec(policy, first).weight_offset if first is not None else 0.0
        attn_module = layer.get_submodule(a.module) if a.module else layer
        attn = InjectedAttention.build(attn_module, a, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_dim=head_dim, backend=backend, norm_offset=offset, model_config=cfg)
        if mlp_module is not None:
            mlp = mlp_module
        else:
            m = policy.mlp
            mlp = InjectedMLP.build(layer.get_submodule(m.module) if m.module else layer, m, backend)

        def norm(name: Optional[str]) -> Optional[torch.nn.Module]:
            return None if name is None else norm_from_spec(layer, _norm_spec(policy, name), backend)

        return cls(attn, mlp, norm(policy.input_norm), norm(policy.post_attention_norm), kind,
                   CallSignature.of(type(layer)), backend, attn_out_norm=norm(policy.attention_output_norm),
                   mlp_out_norm=norm(policy.mlp_output_norm), residual_scale=read_value(cfg, policy.residual_scale))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out[0] if isinstance(out, tuple) else out

    def run(self, hidden: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            attend: Attend) -> torch.Tensor:
        """The block on ``hidden [B, T, hidden]`` with rotary tables ``cos``/``sin`` and an ``attend``."""
        x = hidden
        if self.kind is BlockKind.PRE_NORM and not self.defers_residual:
            return self._run_general(x, cos, sin, attend)
        if self.kind is BlockKind.PRE_NORM:
            mlp_out, h = self.run_deferred(x, None, cos, sin, attend)
            return h + mlp_out
        if self.kind is BlockKind.PARALLEL:
            n1 = self.norm1(x)
            n2 = self.norm2(x) if self.norm2 is not None else n1
            a = self.attn.run(n1, cos, sin, attend)
            return (self._mlp(n2) + a) + x
        a = self.attn.run(x, cos, sin, attend)
        h, _ = self.norm1.forward_add(a, x)
        out, _ = self.norm2.forward_add(self._mlp(h), h)
        return out

    def _run_general(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                     attend: Attend) -> torch.Tensor:
        """A pre-norm block with sandwich norms, missing input norms or a residual scale:
        ``h = x + s * attn_out_norm(attn(norm1(x)))``; ``out = h + s * mlp_out_norm(mlp(norm2(h)))``."""
        a = self.attn.run(self.norm1(x) if self.norm1 is not None else x, cos, sin, attend)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        if self.residual_scale is not None:
            a = a * self.residual_scale
        h = x + a
        m = self._mlp(self.norm2(h) if self.norm2 is not None else h)
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        if self.residual_scale is not None:
            m = m * self.residual_scale
        return h + m

    @property
    def defers_residual(self) -> bool:
        """Whether :meth:`run_deferred` applies: a plain pre-norm block (two fused input norms with
        ``forward_add``; no sandwich norms, no residual scale)."""
        return (self.kind is BlockKind.PRE_NORM and self.norm1 is not None and self.norm2 is not None
                and self.attn_out_norm is None and self.mlp_out_norm is None and self.residual_scale is None)

    def run_deferred(self, hidden: torch.Tensor, pending: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor], attend: Attend) -> Tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block on the hidden state ``hidden + pending`` that leaves its own last residual add
        undone: returns ``(mlp_out, h)`` with the output being ``h + mlp_out``. The next block (or the final
        norm) folds that add into its first norm's kernel, so a stack of blocks runs no separate add kernel:
        ``run`` ends with ``h + mlp(norm2(h))`` as one elementwise launch per layer, ``run_deferred`` none.

        Example:
            >>> import torch
            >>> from policyinject.testing.presets import tiny_model
            >>> from policyinject.modules.attention import sdpa
            >>> from policyinject_plugins.llama import LLAMA_LAYER
            >>> model = tiny_model("llama")
            >>> block = InjectedBlock.build(model.model.layers[0], LLAMA_LAYER, num_heads=4, num_kv_heads=2,
            ...                             head_dim=16, backend="torch")
            >>> x, r = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
            >>> pe = model.model.rotary_emb(x, torch.arange(5)[None])
            >>> attend = lambda q, k, v: sdpa(q, k, v, None)
            >>> mlp_out, h = block.run_deferred(x, r, *pe, attend)
            >>> torch.allclose(mlp_out + h, block.run(x + r, *pe, attend), atol=1e-5)
            True
        """
        if not self.defers_residual:
            raise PolicyError(f"run_deferred needs a pre-norm block, not kind={self.kind.value}")
        done = self.attn.run_normed(hidden, pending, self.norm1, cos, sin, attend) if self.fuse_norms else None
        if done is not None:
            a, x = done
        else:
            if pending is None:
                n1, x = self.norm1(hidden), hidden
            else:
                n1, x = self.norm1.forward_add(pending, hidden)
            a = self.attn.run(n1, cos, sin, attend)
        if self.fuse_norms and isinstance(self.mlp, InjectedMLP):
            mlp_done = self.mlp.run_normed(a, x, self.norm2)
            if mlp_done is not None:
                return mlp_done
        n2, h = self.norm2.forward_add(a, x)
        return self._mlp(n2), h

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face layer call: same arguments and result shape as the replaced layer."""
        bound = self.signature.bind(args, kwargs)
        x = self.signature.hidden(bound)
        cos, sin = _rotary_tables(bound)
        attend = self.attn.attend_fn(bound.get("attention_mask"), find_cache(bound), _cache_kwargs(bound, cos, sin))
        return self.signature.wrap(self.run(x, cos, sin, attend))

    def extra_repr(self) -> str:
        extra = ", sandwich norms" if self.attn_out_norm is not None or self.mlp_out_norm is not None else ""
        if self.residual_scale is not None:
            extra += f", residual_scale={self.residual_scale}"
        return f"kind={self.kind.value}, backend={self.backend}{extra}"
