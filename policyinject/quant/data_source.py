"""Calibration input for the calibrated quantization methods (``gptq``, ``awq``): the ``quant.calibration`` keys.

``quant.calibration.data`` takes one of:

* ``None`` (the default): the text shipped with the package, :data:`DEFAULT_TEXT` -- a frozen ~79 KB snapshot
  of this project's own documentation and a few of its source files (English technical prose, tables and
  Python code; Apache-2.0 like the package). It works offline on every platform, and it is *not* the text the
  accuracy table evaluates on (Debian's GPL-3).
* a path to a UTF-8 text file (``str`` or path-like);
* a list (or tuple) of token-id tensors, each ``[seq]`` or ``[rows, seq]`` (integer dtype): used as given,
  each row cut to ``seq_len``;
* a callable taking no argument and returning an iterable of such tensors (a generator of batches).

Text needs a tokenizer: ``quant.calibration.tokenizer`` (a Hugging Face tokenizer, or any callable mapping a
string to ``{"input_ids": ...}``). Text is tokenized once; ``num_samples`` windows of ``seq_len`` tokens are
drawn at offsets from a ``torch.Generator`` seeded with ``seed``, so the same seed gives the same samples.
Token rows (tensor lists, callables) are taken in order, at most ``num_samples`` of them.

Example:
    >>> import torch
    >>> rows = calibration_rows(CalibrationSpec(data=[torch.arange(10), torch.arange(20).reshape(2, 10)],
    ...                                         num_samples=2, seq_len=8))
    >>> [tuple(r.shape) for r in rows], rows[1][0, :3].tolist()
    ([(1, 8), (1, 8)], [0, 1, 2])
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional

import attrs
import torch

from ..errors import PlanError

__all__ = ["CalibrationSpec", "DEFAULT_TEXT", "calibration_rows", "describe_data", "calibration_spec_from_config"]

#: The text shipped with the package and used when ``quant.calibration.data`` is None.
DEFAULT_TEXT = Path(__file__).with_name("data") / "calibration.txt"


@attrs.frozen
class CalibrationSpec:
    """The ``quant.calibration`` settings as the calibration code reads them."""

    data: Any = None
    num_samples: int = 8
    seq_len: int = 512
    seed: int = 0
    tokenizer: Any = None
    act_order: bool = True
    gptq_grid: str = "minmax"
    damp: float = 0.1


def calibration_spec_from_config(config: Any) -> CalibrationSpec:
    """Read ``quant.calibration`` from an ``InferenceConfig`` (defaults where a key is absent).

    Example:
        >>> from policyinject.config import load_config
        >>> calibration_spec_from_config(load_config(quant={"calibration": {"num_samples": 4}})).num_samples
        4
    """
    cal = getattr(getattr(config, "quant", None), "calibration", None)
    d = CalibrationSpec()
    return CalibrationSpec(
        data=getattr(cal, "data", d.data), num_samples=int(getattr(cal, "num_samples", d.num_samples)),
        seq_len=int(getattr(cal, "seq_len", d.seq_len)), seed=int(getattr(cal, "seed", d.seed)),
        tokenizer=getattr(cal, "tokenizer", d.tokenizer), act_order=bool(getattr(cal, "act_order", d.act_order)),
        gptq_grid=str(getattr(cal, "gptq_grid", d.gptq_grid)), damp=float(getattr(cal, "damp", d.damp)))


def describe_data(data: Any) -> str:
    """A stable one-line description of ``quant.calibration.data`` (stored in checkpoints' fingerprints).

    Example:
        >>> describe_data(None)
        'default:calibration.txt'
        >>> describe_data([torch.arange(4)])[:7]
        'tokens:'
    """
    if data is None:
        return f"default:{DEFAULT_TEXT.name}"
    if isinstance(data, (str, os.PathLike)):
        return f"file:{os.fspath(data)}"
    if isinstance(data, (list, tuple)):
        digest = hashlib.sha256()
        for t in data:
            if isinstance(t, torch.Tensor):
                digest.update(str(tuple(t.shape)).encode())
                digest.update(t.detach().to(torch.int64).cpu().numpy().tobytes())
        return f"tokens:{digest.hexdigest()[:16]}"
    if callable(data):
        return f"callable:{getattr(data, '__module__', '?')}.{getattr(data, '__qualname__', type(data).__name__)}"
    return f"unknown:{type(data).__name__}"


def _tokenize(text: str, tokenizer: Any, what: str) -> torch.Tensor:
    if tokenizer is None:
        raise PlanError(f"quant.calibration.tokenizer is not set, but the calibration input is text ({what}): "
                        "pass a tokenizer (quant={'calibration': {'tokenizer': tok}}), or give "
                        "quant.calibration.data as a list of token-id tensors")
    if callable(tokenizer):
        out = tokenizer(text)
        ids = out if isinstance(out, (torch.Tensor, list)) else out["input_ids"]
    elif callable(getattr(tokenizer, "encode", None)):
        ids = tokenizer.encode(text)
    else:
        raise PlanError(f"quant.calibration.tokenizer: {type(tokenizer).__name__} is neither callable nor has encode()")
    ids = torch.as_tensor(ids).reshape(-1).to(torch.long)
    return ids


def _rows_from_tensors(tensors: Iterable[Any], spec: CalibrationSpec, where: str) -> List[torch.Tensor]:
    rows: List[torch.Tensor] = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dim() not in (1, 2):
            desc = f"{type(t).__name__}" + (f" {t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else "")
            raise PlanError(f"quant.calibration.data{where}: item {i} must be an integer token-id tensor "
                            f"[seq] or [rows, seq], got {desc}")
        for row in t.reshape(-1, t.shape[-1]):
            if len(rows) >= spec.num_samples:
                return rows
            if row.numel() < 2:
                raise PlanError(f"quant.calibration.data{where}: item {i} has a row of {row.numel()} tokens")
            rows.append(row[: spec.seq_len].to(torch.long).reshape(1, -1).cpu())
    return rows


def calibration_rows(spec: CalibrationSpec) -> List[torch.Tensor]:
    """The calibration samples: a list of ``[1, seq]`` token-id tensors (see the module docstring).

    Example:
        >>> tok = lambda s: {"input_ids": torch.tensor([[ord(c) for c in s]])}
        >>> a = calibration_rows(CalibrationSpec(num_samples=3, seq_len=16, seed=1, tokenizer=tok))
        >>> b = calibration_rows(CalibrationSpec(num_samples=3, seq_len=16, seed=1, tokenizer=tok))
        >>> len(a), tuple(a[0].shape), all(torch.equal(x, y) for x, y in zip(a, b))
        (3, (1, 16), True)
    """
    data = spec.data
    if data is None or isinstance(data, (str, os.PathLike)):
        path = DEFAULT_TEXT if data is None else Path(os.fspath(data))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"quant.calibration.data: cannot read the text file {os.fspath(path)!r}: {exc}") from None
        ids = _tokenize(text, spec.tokenizer, f"the text file {path}" if data is not None else
                        f"the default text {path.name}")
        if ids.numel() <= spec.seq_len:
            raise PlanError(f"quant.calibration.data: the text has {ids.numel()} tokens, not more than "
                            f"quant.calibration.seq_len={spec.seq_len}")
        gen = torch.Generator().manual_seed(spec.seed)
        starts = torch.randint(0, ids.numel() - spec.seq_len + 1, (spec.num_samples,), generator=gen)
        return [ids[s: s + spec.seq_len].reshape(1, -1).clone() for s in starts.tolist()]
    if isinstance(data, (list, tuple)):
        rows = _rows_from_tensors(data, spec, "")
    elif callable(data):
        rows = _rows_from_tensors(data(), spec, " (the callable's batches)")
    else:
        raise PlanError(f"quant.calibration.data must be None, a text file path, a list of token-id tensors or a "
                        f"callable yielding them; got {type(data).__name__}")
    if not rows:
        raise PlanError("quant.calibration.data gave no token rows")
    return rows
