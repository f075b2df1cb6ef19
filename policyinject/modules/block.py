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
from ..policy.model import BlockKind, NormKind
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
    return make_norm(module, kind, spec.weight_offset, spec.eps_attr, backend)


def _norm_spec(policy: Any, name: Optional[str]) -> Any:
    for spec in policy.norms:
        if spec.path == name:
            return spec
    raise PolicyError(f"policy for {policy.layer_name}: norm {name!r} is not among its norms "
                      f"{[s.path for s in policy.norms]}")


class InjectedBlock(torch.nn.Module):
    """A whole layer on fused modules; see the module docstring."""

    def __init__(self, attn: InjectedAttention, mlp: torch.nn.Module, norm1: torch.nn.Module,
                 norm2: Optional[torch.nn.Module], kind: BlockKind, signature: CallSignature,
                 backend: str = "auto") -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.norm1 = norm1
        self.norm2 = norm2
        self.kind = BlockKind(kind)
        self.signature = signature
        self.backend = backend
        if self.kind is not BlockKind.PARALLEL and norm2 is None:
            raise PolicyError(f"a {self.kind.value} block needs two norms")

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
              backend: str = "auto") -> "InjectedBlock":
        """Build from a layer instance and its policy (the layer itself is not modified)."""
        kind = effective_block_kind(policy, layer)
        if kind is BlockKind.OPAQUE:
            raise PolicyError(f"policy for {policy.layer_name} has an opaque block; inject its submodules instead")
        a = policy.attention
        n1 = _norm_spec(policy, policy.input_norm)
        attn_module = layer.get_submodule(a.module) if a.module else layer
        attn = InjectedAttention.build(attn_module, a, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_dim=head_dim, backend=backend, norm_offset=n1.weight_offset)
        m = policy.mlp
        mlp_root = layer.get_submodule(m.module) if m.module else layer
        mlp = InjectedMLP.build(mlp_root, m, backend)
        norm1 = norm_from_spec(layer, n1, backend)
        norm2 = None
        if policy.post_attention_norm is not None:
            norm2 = norm_from_spec(layer, _norm_spec(policy, policy.post_attention_norm), backend)
        return cls(attn, mlp, norm1, norm2, kind, CallSignature.of(type(layer)), backend)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out[0] if isinstance(out, tuple) else out

    def run(self, hidden: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            attend: Attend) -> torch.Tensor:
        """The block on ``hidden [B, T, hidden]`` with rotary tables ``cos``/``sin`` and an ``attend``."""
        x = hidden
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

    @property
    def defers_residual(self) -> bool:
        """Whether :meth:`run_deferred` applies: a pre-norm block (its norms are fused ones, with
        ``forward_add``, and it always has two)."""
        return self.kind is BlockKind.PRE_NORM

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
        if pending is None:
            n1, x = self.norm1(hidden), hidden
        else:
            n1, x = self.norm1.forward_add(pending, hidden)
        a = self.attn.run(n1, cos, sin, attend)
        n2, h = self.norm2.forward_add(a, x)
        return self._mlp(n2), h

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face layer call: same arguments and result shape as the replaced layer."""
        bound = self.signature.bind(args, kwargs)
        x = bound["hidden_states"]
        cos, sin = _rotary_tables(bound)
        attend = self.attn.attend_fn(bound.get("attention_mask"), find_cache(bound), _cache_kwargs(bound, cos, sin))
        return self.signature.wrap(self.run(x, cos, sin, attend))

    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, backend={self.backend}"
