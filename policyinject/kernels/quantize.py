"""Weight quantization formats: int8 and int4 (packed two per byte), per output channel or grouped along K.

Format (what :class:`QuantizedWeight` holds for an ``[N, K]`` weight, ``N`` output and ``K`` input features):

* ``qweight``: int8 ``[N, K]`` for 8 bits; uint8 ``[N, K // 2]`` for 4 bits, where byte ``j`` of a row holds
  input feature ``2j`` in its low nibble and ``2j + 1`` in its high nibble, each nibble storing ``q + 8``.
* ``scales``: ``[N, K // group_size]`` in ``scale_dtype`` (float16 by default: 2 bytes per group; see below).
* ``zeros``: same shape and dtype as ``scales`` for asymmetric quantization, else ``None``. 8 bits: an integer
  zero point (exact in fp16). 4 bits: a fractional zero point, so the grid spans exactly the group's own
  ``[min, max]`` (the Q4_1 / "min-max" grid) instead of a range stretched to contain 0.
* dequantization: ``w[n, k] = (q[n, k] - z[n, k // group_size]) * s[n, k // group_size]``.

Integer ranges: symmetric int8 uses -127..127 (0 exact, the range symmetric); symmetric int4 uses all 16 levels,
-8..7, with the scale ``max(max(w) / 7, -min(w) / 8)`` (0 stays exact; a group whose larger magnitude is negative
gets a 1/8 finer step than absmax / 7 -- the 16th level is worth 6-8 perplexity points at 4 bits, see
docs/quantization.md); asymmetric uses the full ``[-2^(b-1), 2^(b-1) - 1]``. At 4 bits the zero point is
fractional; its fp16 rounding is kept under 1/16 of a step by flooring the scale at ``max|w| / 128`` (which
only binds for groups far from zero whose range is narrow next to their offset).

Group size: ``group_size == K`` means one scale per output channel. :func:`resolve_group_size` maps the
DeepSpeed-style ``q_groups`` (groups per row, ``group_size = K / q_groups``) or an explicit ``group_size`` to
the group size, and picks the default when neither is given: per output channel for 8 bits; for 4 bits 32
when it divides ``K`` (576, 896, 1536, 4096 -> 32; the llama.cpp Q4_1 group), else per output channel.

Scale dtype: float16 by default. Its 10-bit mantissa keeps the stored scale within 2^-11 of the exact one
(bf16 would be 2^-8, the size of an int8 step); weights never need fp16's range (scales are weights / 7 or
/ 127). Cost per weight: 2 bytes per group, i.e. 0.0625 bytes per weight at int4 group 32 (0.016 at group
128), doubled for asymmetric (zeros): the int4 default, asymmetric group 32, is 0.5 + 0.125 = 0.625 bytes per
weight. float32 is available (``scale_dtype=torch.float32``).

Quantization itself runs in plain PyTorch (once, at load time, on whatever device the weight lives on); the
Triton kernels in :mod:`policyinject.kernels.quant_matmul` consume this format.

Example:
    >>> import torch
    >>> w = torch.randn(8, 64)
    >>> qw = quantize_weight(w, num_bits=4, group_size=32)
    >>> qw.qweight.shape, qw.qweight.dtype, qw.scales.shape
    (torch.Size([8, 32]), torch.uint8, torch.Size([8, 2]))
    >>> bool(((dequantize_weight(qw) - w).abs() <= qw.scales.float().repeat_interleave(32, 1) * 0.51).all())
    True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import attrs
import torch

__all__ = [
    "QuantizedWeight",
    "INT4_DEFAULT_GROUP",
    "default_group_size",
    "resolve_group_size",
    "quantize_weight",
    "dequantize_weight",
    "rows_per_chunk",
    "concat_rows",
    "in_row_blocks",
    "pack_int4",
    "unpack_int4",
    "qrange",
    "check_finite",
    "group_scale_zero",
    "quantize_groups",
    "pack_quantized",
]

_SUPPORTED_BITS = (4, 8)


def qrange(num_bits: int, symmetric: bool) -> tuple:
    """The integer range ``(qmin, qmax)`` used for ``num_bits`` bits.

    Example:
        >>> qrange(8, True), qrange(8, False), qrange(4, True), qrange(4, False)
        ((-127, 127), (-128, 127), (-8, 7), (-8, 7))
    """
    _check_bits(num_bits)
    half = 2 ** (num_bits - 1)
    return (-(half - 1), half - 1) if (symmetric and num_bits == 8) else (-half, half - 1)


def _check_bits(num_bits: int) -> None:
    if num_bits not in _SUPPORTED_BITS:
        raise ValueError(f"num_bits must be 8 or 4, got {num_bits!r}")


#: The default int4 group size (llama.cpp's Q4_0/Q4_1 group; see docs/quantization.md, Accuracy).
INT4_DEFAULT_GROUP = 32


def default_group_size(in_features: int, num_bits: int) -> int:
    """Default group size: per output channel (``in_features``) for 8 bits; 32 for 4 bits when it divides
    ``in_features``, else per output channel.

    Example:
        >>> default_group_size(4096, 8), default_group_size(4096, 4), default_group_size(576, 4)
        (4096, 32, 32)
        >>> default_group_size(1000, 4)  # 32 does not divide 1000: per output channel
        1000
    """
    _check_bits(num_bits)
    if num_bits == 8 or in_features % INT4_DEFAULT_GROUP:
        return in_features
    return INT4_DEFAULT_GROUP


def resolve_group_size(
    in_features: int,
    num_bits: int = 8,
    *,
    q_groups: Optional[int] = None,
    group_size: Optional[int] = None,
    name: str = "in_features",
) -> int:
    """The group size along K from ``group_size`` or ``q_groups`` (``group_size = in_features / q_groups``).

    ``group_size`` wins when both are given; ``group_size in (-1, 0)`` or ``q_groups == 1`` means one scale per
    output channel. Neither given: :func:`default_group_size`. ``name`` is used in error messages.

    Example:
        >>> resolve_group_size(4096, q_groups=32), resolve_group_size(576, 4, group_size=64)
        (128, 64)
        >>> resolve_group_size(576, q_groups=5)
        Traceback (most recent call last):
        ...
        ValueError: in_features=576 is not divisible by q_groups=5 (group_size would be 115.2)
    """
    _check_bits(num_bits)
    if in_features <= 0:
        raise ValueError(f"{name}={in_features} must be positive")
    if group_size is not None:
        g = int(group_size)
        if g in (-1, 0):
            g = in_features
        if g < 0 or in_features % g != 0:
            raise ValueError(f"{name}={in_features} is not divisible by group_size={group_size}")
    elif q_groups is not None:
        qg = int(q_groups)
        if qg <= 0 or in_features % qg != 0:
            raise ValueError(
                f"{name}={in_features} is not divisible by q_groups={q_groups} "
                f"(group_size would be {in_features / max(qg, 1):g})"
            )
        g = in_features // qg
    else:
        g = default_group_size(in_features, num_bits)
    if num_bits == 4 and g % 2 != 0:
        raise ValueError(f"4-bit weights pack two values per byte: group_size={g} ({name}={in_features}) must be even")
    return g


@attrs.frozen(eq=False)
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight (see the module docstring for the format)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    num_bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    def nbytes(self) -> int:
        """Bytes of the quantized weight, scales and zero points."""
        n = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            n += self.zeros.numel() * self.zeros.element_size()
        return n

    def to(self, device) -> "QuantizedWeight":
        z = None if self.zeros is None else self.zeros.to(device)
        return attrs.evolve(self, qweight=self.qweight.to(device), scales=self.scales.to(device), zeros=z)


#: Weight elements quantized at once: larger weights go by blocks of rows, so the float32 temporaries of the
#: quantizers stay near 64 MB each (a Llama-3 output head is 525 M elements: several GB of temporaries whole).
CHUNK_ELEMENTS = 1 << 24


def rows_per_chunk(out_features: int, in_features: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows quantized together: as many as fit ``chunk_elements`` (at least one, at most all).

    Example:
        >>> rows_per_chunk(128256, 4096), rows_per_chunk(64, 64)
        (4096, 64)
    """
    return max(1, min(out_features, chunk_elements // max(in_features, 1)))


def concat_rows(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """The quantized weight of the row blocks ``parts`` stacked in order (same bits, group and in_features).

    Example:
        >>> w = torch.randn(6, 64)
        >>> whole = quantize_weight(w, 4, 32, rows_per_block=6)
        >>> torch.equal(concat_rows([quantize_weight(w[:4], 4, 32), quantize_weight(w[4:], 4, 32)]).qweight,
        ...             whole.qweight)
        True
    """
    first = parts[0]
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
    return attrs.evolve(first, qweight=torch.cat([p.qweight for p in parts]),
                        scales=torch.cat([p.scales for p in parts]), zeros=zeros,
                        out_features=sum(p.out_features for p in parts))


def in_row_blocks(
    weight: torch.Tensor, rows_per_block: Optional[int], quantize_block: Callable[[torch.Tensor, int], QuantizedWeight]
) -> Optional[QuantizedWeight]:
    """``weight`` quantized by ``quantize_block(rows, rows_per_block)`` one block of rows at a time and stacked
    (:func:`concat_rows`), or None when it fits one block (``rows_per_block``, default :func:`rows_per_chunk`):
    then the caller quantizes it whole.

    Example:
        >>> w = torch.randn(6, 64)
        >>> in_row_blocks(w, None, lambda b, r: quantize_weight(b, 8, rows_per_block=r)) is None
        True
        >>> in_row_blocks(w, 4, lambda b, r: quantize_weight(b, 8, rows_per_block=r)).out_features
        6
    """
    n = weight.shape[0]
    rows = rows_per_block or rows_per_chunk(n, weight.shape[1])
    if rows >= n:
        return None
    return concat_rows([quantize_block(weight[r:r + rows], rows) for r in range(0, n, rows)])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in ``[-8, 7]`` (shape ``[..., K]``, K even) into uint8 ``[..., K // 2]``.

    Even positions go to the low nibble, odd ones to the high nibble, each stored as ``q + 8``.

    Example:
        >>> q = torch.tensor([[-8, 7, 0, -1]])
        >>> pack_int4(q)
        tensor([[240, 120]], dtype=torch.uint8)
        >>> unpack_int4(pack_int4(q)).tolist()
        [[-8, 7, 0, -1]]
    """
    if q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 takes values in [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K // 2]`` -> int8 ``[..., K]`` in ``[-8, 7]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_weight(
    weight: torch.Tensor,
    num_bits: int = 8,
    group_size: Optional[int] = None,
    symmetric: bool = True,
    *,
    q_groups: Optional[int] = None,
    scale_dtype: torch.dtype = torch.float16,
    rows_per_block: Optional[int] = None,
) -> QuantizedWeight:
    """Quantize an ``[out_features, in_features]`` weight (round to nearest, absmax / min-max per group).

    The integers are computed against the *stored* (rounded) scale, so dequantization error is at most half a
    step plus the tiny clamp error from rounding the scale. Rows are quantized ``rows_per_block`` at a time
    (default :func:`rows_per_chunk`: about 16 M elements), which bounds the temporaries and changes nothing
    in the result (every group is on one row).

    Example:
        >>> w = torch.randn(4, 96)
        >>> qw = quantize_weight(w, 8)                   # per output channel
        >>> qw.group_size, qw.qweight.dtype, qw.scales.shape
        (96, torch.int8, torch.Size([4, 1]))
        >>> qa = quantize_weight(w, 4, symmetric=False, q_groups=3)
        >>> qa.group_size, qa.zeros.shape
        (32, torch.Size([4, 3]))
    """
    _check_bits(num_bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight takes a 2-D [out_features, in_features] weight, got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"quantize_weight takes a floating-point weight, got {weight.dtype}")
    n, k = weight.shape
    g = resolve_group_size(k, num_bits, q_groups=q_groups, group_size=group_size)
    blocks = in_row_blocks(weight, rows_per_block, lambda block, rows: quantize_weight(
        block, num_bits, g, symmetric, scale_dtype=scale_dtype, rows_per_block=rows))
    if blocks is not None:
        return blocks
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    check_finite(w)
    scale_q, zero = group_scale_zero(w, num_bits, symmetric, scale_dtype)
    q = quantize_groups(w, scale_q.to(torch.float32), zero, num_bits, symmetric)
    return pack_quantized(q.reshape(n, k), scale_q, zero, num_bits, scale_dtype)


def check_finite(weight: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``weight`` holds a NaN or an infinity (they would quantize to garbage silently).

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        ValueError: cannot quantize a weight holding NaN or infinite values
    """
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("cannot quantize a weight holding NaN or infinite values")


def group_scale_zero(
    w: torch.Tensor, num_bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple:
    """Round-to-nearest scale and zero point of each group of ``w`` (``[..., group_size]``, float32).

    Returns ``(scale, zero)``: ``scale`` in ``scale_dtype`` (rounded up, never down, never 0), shape
    ``w.shape[:-1]``; ``zero`` float32 holding exactly the stored value (None when symmetric). Symmetric:
    ``max(max(w) / qmax, min(w) / qmin)`` (absmax / 127 at 8 bits). Asymmetric 8 bits: integer zero point, range stretched to contain 0. Asymmetric 4 bits:
    the group's own min-max grid with a fractional zero point, scale floored at ``max|w| / 128``.

    Example:
        >>> s, z = group_scale_zero(torch.tensor([[-1.0, 0.0, 14.0]]), 4, False)   # min-max grid: step 15 / 15
        >>> float(s[0]), float(z[0])
        (1.0, -7.0)
        >>> float(group_scale_zero(torch.tensor([[-4.0, 3.0]]), 4, True)[0][0])   # symmetric: max(3 / 7, 4 / 8)
        0.5
    """
    qmin, qmax = qrange(num_bits, symmetric)
    finfo = torch.finfo(scale_dtype)
    # Smallest positive value representable in scale_dtype (subnormal for fp16): a scale never rounds to 0.
    tiny = finfo.smallest_normal * finfo.eps if scale_dtype == torch.float16 else finfo.tiny
    zero = None
    if symmetric:
        scale = torch.maximum(w.amax(dim=-1).clamp(min=0.0) / qmax, w.amin(dim=-1).clamp(max=0.0) / qmin)
    elif num_bits == 8:
        wmin = w.amin(dim=-1).clamp(max=0.0)
        wmax = w.amax(dim=-1).clamp(min=0.0)
        scale = (wmax - wmin) / (qmax - qmin)
    else:  # 4-bit min-max grid with a fractional zero point
        wmin = w.amin(dim=-1)
        wmax = w.amax(dim=-1)
        scale = torch.maximum((wmax - wmin) / (qmax - qmin), torch.maximum(wmin.abs(), wmax.abs()) / 128)
    if bool((scale > finfo.max).any()):
        raise ValueError(f"weight values too large for {scale_dtype} scales; pass scale_dtype=torch.float32")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=tiny)
    scale_q = scale.to(scale_dtype)
    # Round the stored scale up, never down: a scale rounded down (fp16 subnormals for tiny weights lose
    # up to a few percent) would push the group's extreme values past the integer range and clamp them.
    rounded_down = scale_q.to(torch.float32) < scale
    scale_q = torch.where(rounded_down, torch.nextafter(scale_q, torch.full_like(scale_q, float("inf"))), scale_q)
    s = scale_q.to(torch.float32)
    if not symmetric and num_bits == 8:
        zero = torch.round(qmin - wmin / s).clamp(qmin, qmax)
    elif not symmetric:
        zero = (qmin - wmin / s).to(scale_dtype).to(torch.float32)  # as stored, so q matches dequantization
    return scale_q, zero


def quantize_groups(
    w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], num_bits: int, symmetric: bool
) -> torch.Tensor:
    """The integers (float32, in range) of ``w`` (``[..., g]``) on the grid of ``scale``/``zero`` (``[...]``).

    Example:
        >>> quantize_groups(torch.tensor([[0.5, -1.0]]), torch.tensor([0.25]), None, 4, True).tolist()
        [[2.0, -4.0]]
    """
    qmin, qmax = qrange(num_bits, symmetric)
    if symmetric:
        return torch.round(w / scale[..., None]).clamp(qmin, qmax)
    if num_bits == 8:
        return (torch.round(w / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
    return torch.round(w / scale[..., None] + zero[..., None]).clamp(qmin, qmax)


def pack_quantized(
    q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], num_bits: int,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from integers ``q`` ``[N, K]`` and ``scale``/``zero`` ``[N, K // g]``.

    Example:
        >>> qw = pack_quantized(torch.zeros(2, 8), torch.ones(2, 2), None, 4)
        >>> qw.qweight.shape, qw.scales.dtype, qw.group_size
        (torch.Size([2, 4]), torch.float16, 4)
    """
    n, k = q.shape
    q = q.to(torch.int8)
    qweight = q if num_bits == 8 else pack_int4(q)
    zeros = None if zero is None else zero.to(scale_dtype).contiguous()
    return QuantizedWeight(
        qweight=qweight.contiguous(),
        scales=scale.to(scale_dtype).contiguous(),
        zeros=zeros,
        num_bits=num_bits,
        group_size=k // scale.shape[-1],
        in_features=k,
        out_features=n,
    )


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out_features, in_features]`` weight a :class:`QuantizedWeight` stands for, in ``dtype``.

    Example:
        >>> w = torch.randn(3, 64)
        >>> float((dequantize_weight(quantize_weight(w, 8)) - w).abs().max()) < float(w.abs().max()) / 127
        True
    """
    q = qw.qweight if qw.num_bits == 8 else unpack_int4(qw.qweight)
    q = q.to(torch.float32).reshape(qw.out_features, qw.num_groups, qw.group_size)
    s = qw.scales.to(torch.float32)[..., None]
    if qw.zeros is not None:
        q = q - qw.zeros.to(torch.float32)[..., None]
    return (q * s).reshape(qw.out_features, qw.in_features).to(dtype)
