"""Checks of a ``generate`` call's prompt and attention mask, before anything runs on the device.

Every malformed input is a clear error naming the argument (Hugging Face's own ``generate`` answers most of
these with an internal ``RuntimeError`` / ``IndexError`` from deep inside the model, or computes on):

=========================================== ===================================================================
input                                       result
=========================================== ===================================================================
not a tensor (a list, a numpy array)        ``TypeError`` (pass ``torch.tensor(...)``)
1-D ``input_ids``                           ``ValueError`` (pass ``ids[None]`` for one prompt)
floating-point or bool ``input_ids``        ``TypeError`` naming the dtype
no tokens ``(B, 0)`` or no rows ``(0, T)``  ``ValueError``
token ids < 0 or >= the vocabulary          ``ValueError`` naming the smallest / largest id and the vocabulary
mask shape differs from ``input_ids``       ``ValueError`` naming both shapes
mask values other than 0 / 1                ``ValueError``
a row that is padding everywhere            ``ValueError`` naming the row
right padding (last column masked)          ``ValueError`` (the decode engine needs left padding)
=========================================== ===================================================================

Example:
    >>> import torch
    >>> ids, mask = check_inputs(torch.tensor([[5, 6]]), None, vocab_size=10)
    >>> mask is None, ids.dtype
    (True, torch.int64)
    >>> try:
    ...     check_inputs(torch.tensor([[5, 60]]), None, vocab_size=10)
    ... except ValueError as e:
    ...     print(e)
    input_ids hold token ids outside the vocabulary [0, 10): largest 60 at row 0, column 1

The values are checked on a host copy: a prompt on the GPU costs one device-to-host copy of the ids and one of
the mask, instead of a synchronisation per check.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["check_inputs", "check_mask"]


def _host(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself on the CPU, else one copy to the host (the only synchronisation of a check)."""
    return t if t.device.type == "cpu" else t.cpu()


def _tensor(name: str, value: Any, hint: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {hint}, got {type(value).__name__}; "
                        f"wrap it: torch.tensor({name})")
    return value


def check_inputs(input_ids: Any, attention_mask: Any, vocab_size: Optional[int]
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate ``input_ids`` (``[batch, tokens]`` integer ids) and ``attention_mask`` (same shape, 0/1, left
    padded); returns ``(ids as long, mask or None)`` on the inputs' own device. See the module docstring."""
    if input_ids is None:
        raise ValueError("generate needs `input_ids` (a [batch, tokens] tensor of token ids)")
    ids = _tensor("input_ids", input_ids, "of token ids, shape [batch, tokens]")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {ids.dtype}; "
                        "convert with input_ids.long() if the values are ids")
    if ids.dim() != 2:
        hint = " (one prompt: input_ids[None])" if ids.dim() == 1 else ""
        raise ValueError(f"`input_ids` must be a [batch, tokens] tensor, got shape {tuple(ids.shape)}{hint}")
    b, t = ids.shape
    if b == 0 or t == 0:
        raise ValueError(f"`input_ids` of shape {tuple(ids.shape)} holds no prompt: generate needs at least one "
                         "row of at least one token")
    ids = ids.long()
    if vocab_size is not None:
        host = _host(ids)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= vocab_size:
            bad, which = (lo, "smallest") if lo < 0 else (hi, "largest")
            r, c = (host == bad).nonzero()[0].tolist()
            raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {vocab_size}): {which} {bad} "
                             f"at row {r}, column {c}")
    mask = None if attention_mask is None else check_mask(attention_mask, ids)
    return ids, mask


def check_mask(attention_mask: Any, ids: torch.Tensor) -> torch.Tensor:
    """Validate an ``attention_mask`` for ``ids [B, T]``: same shape, values 0/1, no all-padding row, left
    padding. Returns it as a long tensor.

    Example:
        >>> check_mask(torch.tensor([[0, 1], [1, 1]]), torch.ones(2, 2, dtype=torch.long)).tolist()
        [[0, 1], [1, 1]]
    """
    mask = _tensor("attention_mask", attention_mask, "of 0/1 entries, shape [batch, tokens]")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"`attention_mask` has shape {tuple(mask.shape)} but `input_ids` has shape "
                         f"{tuple(ids.shape)}; they must match")
    if mask.is_complex():
        raise TypeError(f"`attention_mask` must hold 0/1 entries, got dtype {mask.dtype}")
    host = _host(mask)
    if host.dtype != torch.bool and not bool(((host == 0) | (host == 1)).all()):
        raise ValueError("`attention_mask` must hold only 0 and 1 (1: a real token, 0: padding); got values "
                         f"{sorted(set(host.flatten().tolist()))[:8]}")
    host = host.long()
    empty = (host.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"`attention_mask` row(s) {empty} are padding everywhere: a prompt needs at least one "
                         "token to generate from")
    if not bool(host[:, -1].all()):
        rows = (host[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"right padding detected in `attention_mask` row(s) {rows}: the decode engine needs "
                         "left-padded prompts (tokenizer.padding_side = 'left')")
    return mask.long()
