"""Plain-PyTorch references of the fused kernels.

Every function computes in float32 and casts the result back to the input dtype once, at the end. They are
the ground truth for the Triton kernels (``backend="torch"`` runs them) and are themselves checked against the
Hugging Face modules in ``tests/kernels/test_kernel_reference_vs_hf.py``.

Conventions:

- Norms normalise over the last dimension; any leading dimensions.
- ``weight_offset`` scales by ``(weight_offset + weight)``: 0.0 for Llama-style norms, 1.0 for Gemma-style.
- The fused residual variants return ``(normed, new_residual)`` with ``new_residual = x + residual`` rounded to
  its dtype (``torch.result_type(x, residual)``) *before* it is normalised, exactly like Hugging Face, which
  adds in the model dtype and then calls the norm on the sum.
- Rotary: ``q`` is ``[B, Hq, T, D]``, ``k`` is ``[B, Hkv, T, D]``; ``cos``/``sin`` are ``[B, T, R]`` or
  ``[T, R]`` with ``R = rotary_dim <= D`` (even). Only the first ``R`` dims of each head are rotated, the rest
  pass through (GPT-NeoX / Phi partial rotary).

  * ``layout="half"`` (Llama, NeoX): ``out = x * cos + rotate_half(x) * sin`` on the first ``R`` dims, where
    ``rotate_half(x) = cat(-x[R/2:], x[:R/2])``. ``cos``/``sin`` are what ``LlamaRotaryEmbedding`` returns:
    ``cat(freqs, freqs)``.
  * ``layout="interleaved"`` (GPT-J, GLM-style): pairs ``(x[2i], x[2i+1])`` rotate together:
    ``out = x * cos + rotate_every_two(x) * sin`` with ``rotate_every_two(x)[2i] = -x[2i+1]`` and
    ``rotate_every_two(x)[2i+1] = x[2i]``. ``cos``/``sin`` are in the *interleaved* convention: each
    frequency repeated twice, adjacent, ``cos[..., 2i] == cos[..., 2i+1] == cos(pos * inv_freq[i])`` (GPT-J's
    ``repeat_interleave(cos, 2, -1)``). Use :func:`interleave_cos_sin` to build them from the half-size
    tables.

Example:
    >>> import torch
    >>> from policyinject.kernels import reference as ref
    >>> x = torch.randn(2, 8)
    >>> y = ref.rms_norm(x, torch.ones(8), 1e-6)
    >>> torch.allclose(y.pow(2).mean(-1), torch.ones(2), atol=1e-4)
    True
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "layer_norm",
    "add_layer_norm",
    "rotary",
    "rotate_half",
    "rotate_every_two",
    "interleave_cos_sin",
    "swiglu",
    "geglu",
    "gated_act",
    "ACTIVATIONS",
    "canonical_activation",
]

#: Canonical activation names of the gated MLPs, and the aliases (Hugging Face ``hidden_act`` values) that map
#: to them. ``gelu`` is the exact (erf) GELU, as in HF's ``ACT2FN["gelu"]``.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "swiglu": "silu",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "geglu_tanh": "gelu_tanh",
    "gelu": "gelu",
    "gelu_exact": "gelu",
    "geglu": "gelu",
}


def canonical_activation(activation: str) -> str:
    """Map an activation name (canonical or HF alias) to ``"silu"``, ``"gelu_tanh"`` or ``"gelu"``.

    Example:
        >>> canonical_activation("gelu_pytorch_tanh")
        'gelu_tanh'
    """
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"unknown gated activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


# --------------------------------------------------------------------------------------------------- norms


def rms_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, weight_offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x**2) + eps) * (weight_offset + weight)``.

    Computed in float32, returned in ``x.dtype``. ``weight=None`` means no scale.

    Example:
        >>> import torch
        >>> rms_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0]), 0.0)
        tensor([[0.8485, 2.2627]])
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.float() + weight_offset)
    return y.to(x.dtype)


def _residual_sum(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    dtype = torch.result_type(x, residual)
    return (x.float() + residual.float()).to(dtype)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``.

    The sum is rounded to ``result_type(x, residual)`` and that rounded value is normalised (as HF does);
    ``normed`` has ``x.dtype``.

    Example:
        >>> import torch
        >>> y, s = add_rms_norm(torch.ones(1, 2), torch.ones(1, 2), torch.ones(2), 0.0)
        >>> y, s
        (tensor([[1., 1.]]), tensor([[2., 2.]]))
    """
    s = _residual_sum(x, residual)
    return rms_norm(s, weight, eps, weight_offset).to(x.dtype), s


def layer_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim (biased variance, like ``nn.LayerNorm``), in float32, cast back.

    Example:
        >>> import torch
        >>> layer_norm(torch.tensor([[1.0, 3.0]]), None, None, 0.0)
        tensor([[-1.,  1.]])
    """
    n = x.shape[-1]
    y = F.layer_norm(
        x.float(),
        (n,),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    return y.to(x.dtype)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add then LayerNorm: returns ``(layer_norm(x + residual), x + residual)``.

    Example:
        >>> import torch
        >>> y, s = add_layer_norm(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]]), None, None, 0.0)
        >>> y, s
        (tensor([[-1.,  1.]]), tensor([[1., 3.]]))
    """
    s = _residual_sum(x, residual)
    return layer_norm(s, weight, bias, eps).to(x.dtype), s


# -------------------------------------------------------------------------------------------------- rotary


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` of the two halves of the last dim (Hugging Face's ``rotate_half``).

    Example:
        >>> import torch
        >>> rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([-3., -4.,  1.,  2.])
    """
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Pairwise rotation of adjacent dims: ``[x0, x1, x2, x3] -> [-x1, x0, -x3, x2]`` (GPT-J).

    Example:
        >>> import torch
        >>> rotate_every_two(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([-2.,  1., -4.,  3.])
    """
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def interleave_cos_sin(cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn half-size tables ``[..., R/2]`` (one entry per frequency) into the interleaved convention
    ``[..., R]`` that :func:`rotary` expects for ``layout="interleaved"`` (each entry repeated twice).

    Example:
        >>> import torch
        >>> c, s = interleave_cos_sin(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
        >>> c, s
        (tensor([1., 1., 2., 2.]), tensor([3., 3., 4., 4.]))
    """
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def check_rotary_args(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
    rotary_dim: Optional[int],
) -> int:
    """Validate the rotary arguments; return the rotary dim ``R``. Shared by the reference and the kernel."""
    if layout not in ("half", "interleaved"):
        raise ValueError(f"rotary layout must be 'half' or 'interleaved', got {layout!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, heads, tokens, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}")
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, tokens or head_dim")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    r = cos.shape[-1]
    if rotary_dim is not None and rotary_dim != r:
        raise ValueError(f"rotary_dim={rotary_dim} but cos/sin have last dim {r}")
    if r % 2 or r > d or r == 0:
        raise ValueError(f"rotary dim {r} must be even, positive and <= head_dim {d}")
    if cos.dim() == 2:
        ok = cos.shape[0] == t
    elif cos.dim() == 3:
        ok = cos.shape[1] == t and cos.shape[0] in (1, b)
    else:
        ok = False
    if not ok:
        raise ValueError(f"cos/sin must be [batch, tokens, R] or [tokens, R]; got {tuple(cos.shape)} for q {tuple(q.shape)}")
    return r


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "half",
    rotary_dim: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q ``[B, Hq, T, D]`` and k ``[B, Hkv, T, D]``; returns new tensors.

    ``cos``/``sin``: ``[B, T, R]`` or ``[T, R]`` (``R = rotary_dim``, defaults to ``cos.shape[-1]``); the
    first ``R`` dims of each head are rotated, the rest pass through. See the module docstring for the
    two layouts.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 4, 3, 8); k = torch.randn(1, 2, 3, 8)
        >>> zero = torch.zeros(3, 8)
        >>> qo, ko = rotary(q, k, zero + 1, zero)           # angle 0: identity
        >>> torch.equal(qo, q) and torch.equal(ko, k)
        True
    """
    r = check_rotary_args(q, k, cos, sin, layout, rotary_dim)
    c = cos.float()
    s = sin.float()
    if c.dim() == 3:
        c = c.unsqueeze(1)
        s = s.unsqueeze(1)
    rot = rotate_half if layout == "half" else rotate_every_two

    def apply(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xr = xf[..., :r]
        out = xr * c + rot(xr) * s
        if r < x.shape[-1]:
            out = torch.cat((out, xf[..., r:]), dim=-1)
        return out.to(x.dtype)

    return apply(q), apply(k)


# ------------------------------------------------------------------------------------------- activations


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    act = canonical_activation(activation)
    if act == "silu":
        return F.silu(gate)
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    return F.gelu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (LlamaMLP: ``down(act(gate(x)) * up(x))``), in float32, cast back.

    Example:
        >>> import torch
        >>> swiglu(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]))
        tensor([0.0000, 1.4621])
    """
    dtype = torch.result_type(gate, up)
    return (F.silu(gate.float()) * up.float()).to(dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up``; ``approximate="tanh"`` is HF's ``gelu_pytorch_tanh``/``gelu_new``, ``"none"`` the
    exact erf GELU (HF ``gelu``).

    Example:
        >>> import torch
        >>> geglu(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), approximate="none")
        tensor([0.0000, 0.8413])
    """
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    dtype = torch.result_type(gate, up)
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(dtype)


def gated_act(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Gated activation on a fused ``[..., 2*I]`` tensor: first half is the gate, second half is up.

    ``activation``: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` or ``"gelu"`` (exact), or an HF alias
    (see :data:`ACTIVATIONS`).

    Example:
        >>> import torch
        >>> gated_act(torch.tensor([[0.0, 1.0, 2.0, 2.0]]), "silu")
        tensor([[0.0000, 1.4621]])
    """
    n2 = gate_up.shape[-1]
    if n2 % 2:
        raise ValueError(f"gate_up last dim must be even (gate then up), got {n2}")
    gate, up = gate_up[..., : n2 // 2], gate_up[..., n2 // 2 :]
    return (_act(gate.float(), activation) * up.float()).to(gate_up.dtype)
