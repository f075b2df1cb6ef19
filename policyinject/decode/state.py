"""Device-side state of one generation: the buffers a decode step reads and updates in place.

A :class:`DecodeState` is allocated once per batch size and reused by every call with that batch size: a
captured CUDA graph reads and writes exactly these tensors, so a call only copies its inputs into them
(:meth:`DecodeState.start`) and then replays. Nothing in a step needs the host: the current token,
positions, the cache slot, the step counter, the finished flags and the output tokens all live here.

Buffers (``B`` rows, ``L`` cache slots, ``V`` vocabulary entries):

========== ============ =================================================================================
name       shape/dtype  meaning
========== ============ =================================================================================
tokens     [B] long     the token fed to the next step
pos        [B] long     its rotary / learned position (real tokens before it in its row)
cache_pos  [1] long     the cache slot the next step writes (same for every row: prompts are left-padded)
step       [1] long     index of the next generated token (0 = the token chosen from the prefill)
kv_mask    [B, L] bool  written, non-pad slots
finished   [B] bool     rows that produced an EOS token
out        [B, L] long  generated tokens (pad after a row finished)
eos_vocab  [V] bool     which vocabulary entries are EOS tokens
pad        [1] long     pad token for finished rows
min_new    [1] long     EOS is suppressed while ``step < min_new``
logits     [B, V] f32   the last step's logits (read by eager sampling; internal, overwritten every step)
slots      [L] long     ``arange(L)``, for sliding-window masks
nonfinite  [1] bool     set by any step whose logits held NaN / +inf or a row of all -inf (read once, at the end)
seen       [B, V] bool  tokens in each row so far (prompt after its left padding, then generated): the
                        repetition penalty's set
penalty    [1] f32      the repetition penalty (1.0: none)
========== ============ =================================================================================

Example:
    >>> import torch
    >>> st = DecodeState(batch=2, max_len=8, vocab=10, device="cpu")
    >>> st.start(torch.tensor([[0, 1, 1], [1, 1, 1]]), eos_ids=[3], pad=0, min_new=0)
    >>> st.pos.tolist(), int(st.cache_pos)
    ([2, 3], 3)
    >>> st.advance(torch.tensor([3, 5]))
    >>> st.finished.tolist(), st.out[:, 0].tolist(), st.tokens.tolist()
    ([True, False], [3, 5], [3, 5])
    >>> st.consumed(); st.pos.tolist(), int(st.cache_pos)
    ([3, 4], 4)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["DecodeState"]

_MUTABLE = ("tokens", "pos", "cache_pos", "step", "kv_mask", "finished", "out", "logits", "nonfinite", "seen")


class DecodeState:
    """The per-batch-size device buffers of the decode loop; see the module docstring."""

    def __init__(self, batch: int, max_len: int, vocab: int, device: Any) -> None:
        self.batch = int(batch)
        self.max_len = int(max_len)
        self.vocab = int(vocab)
        self.device = torch.device(device)
        d = self.device
        long = dict(dtype=torch.long, device=d)
        self.tokens = torch.zeros(batch, **long)
        self.pos = torch.zeros(batch, **long)
        self.cache_pos = torch.zeros(1, **long)
        self.step = torch.zeros(1, **long)
        self.kv_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=d)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=d)
        self.out = torch.zeros(batch, max_len, **long)
        self.eos_vocab = torch.zeros(vocab, dtype=torch.bool, device=d)
        self.pad = torch.zeros(1, **long)
        self.min_new = torch.zeros(1, **long)
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=d)
        self.slots = torch.arange(max_len, **long)
        self.nonfinite = torch.zeros(1, dtype=torch.bool, device=d)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=d)
        self.penalty = torch.ones(1, dtype=torch.float32, device=d)
        #: whether :meth:`advance` records tokens in ``seen`` (only the repetition penalty reads it)
        self.track_seen = False

    def start(self, attention_mask: torch.Tensor, eos_ids: Optional[Sequence[int]], pad: int, min_new: int,
              input_ids: Optional[torch.Tensor] = None, penalty: Optional[float] = None) -> None:
        """Reset for a new call after a prefill of the left-padded ``attention_mask [B, T]`` (copies only).

        ``input_ids [B, T]`` fill the repetition penalty's ``seen`` set (Hugging Face's rule: every prompt
        token after the row's left padding)."""
        b, t = attention_mask.shape
        if b != self.batch:
            raise ValueError(f"state for batch {self.batch} got a prompt batch of {b}")
        mask = attention_mask.to(device=self.device, dtype=torch.bool)
        self.kv_mask.zero_()
        self.kv_mask[:, :t].copy_(mask)
        self.pos.copy_(mask.sum(-1))
        self.cache_pos.fill_(t)
        self.step.zero_()
        self.finished.zero_()
        self.out.fill_(int(pad))
        self.eos_vocab.zero_()
        if eos_ids:
            ids = torch.tensor([int(i) for i in eos_ids if 0 <= int(i) < self.vocab], dtype=torch.long)
            self.eos_vocab.index_fill_(0, ids.to(self.device, non_blocking=True), True)
        self.pad.fill_(int(pad))
        self.min_new.fill_(int(min_new))
        self.nonfinite.zero_()
        self.seen.zero_()
        self.penalty.fill_(1.0 if penalty is None else float(penalty))
        self.track_seen = penalty is not None
        if input_ids is not None and penalty is not None:
            ids = input_ids.to(device=self.device, dtype=torch.long)
            after_pad = mask.long().cumsum(-1) > 0
            wide = torch.zeros(b, self.vocab + 1, dtype=torch.bool, device=self.device)
            wide.scatter_(1, torch.where(after_pad, ids, self.vocab), True)
            self.seen.copy_(wide[:, :self.vocab])

    def eos_suppressed(self) -> torch.Tensor:
        """``[V]`` bool: the EOS entries while fewer than ``min_new`` tokens were generated, else all False."""
        return self.eos_vocab & (self.step < self.min_new)

    def advance(self, next_tokens: torch.Tensor) -> None:
        """Record the tokens chosen at this step as the next input; no host synchronisation.

        Finished rows get ``pad``; a row finishes when it produces an EOS token (Hugging Face semantics).
        """
        nxt = torch.where(self.finished, self.pad, next_tokens)
        self.out.index_copy_(1, self.step, nxt[:, None])
        self.finished |= self.eos_vocab[nxt]
        if self.track_seen:
            self.seen.scatter_(1, nxt[:, None], True)
        self.tokens.copy_(nxt)
        self.step += 1

    def consumed(self) -> None:
        """The model step has read ``tokens`` at ``pos``/``cache_pos``: move both on by one."""
        self.pos += 1
        self.cache_pos += 1

    def snapshot(self) -> Callable[[], None]:
        """A function restoring every mutable buffer to its current value (used around graph warm-up)."""
        saved = {name: getattr(self, name).clone() for name in _MUTABLE}

        def restore() -> None:
            for name, value in saved.items():
                getattr(self, name).copy_(value)

        return restore
