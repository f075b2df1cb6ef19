"""Hugging Face's streamer protocol for the decode engine's ``generate``.

A streamer is any object with ``put(token_ids)`` and ``end()`` (``transformers.TextStreamer``,
``TextIteratorStreamer``, or a user's own). As in Hugging Face's ``generate``: ``put`` receives the prompt
first (``[B, T]``, on the CPU), then the tokens of each step (``[B]``, on the CPU; pad for rows that have
finished), and ``end()`` is called once generation is over. Each ``put`` gets its own CPU copy, so a
streamer may keep what it was given. Handing tokens over as they are made needs one host synchronisation per
token; without a streamer there is none.

Example:
    >>> import torch
    >>> class Collect:
    ...     def __init__(self): self.got = []
    ...     def put(self, ids): self.got.append(ids.tolist())
    ...     def end(self): self.got.append("end")
    >>> s = check_streamer(Collect())
    >>> put(s, torch.tensor([[5, 6]])); put(s, torch.tensor([7])); s.end(); s.got
    [[[5, 6]], [7], 'end']
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["check_streamer", "put"]


def check_streamer(streamer: Any) -> Optional[Any]:
    """``streamer`` itself when it has callable ``put`` and ``end`` (None stays None), else ``TypeError``."""
    if streamer is None:
        return None
    missing = [m for m in ("put", "end") if not callable(getattr(streamer, m, None))]
    if missing:
        raise TypeError(f"`streamer` ({type(streamer).__name__}) lacks {' and '.join(missing)}(): a streamer needs "
                        "put(token_ids) and end(), as transformers.TextStreamer has")
    return streamer


def put(streamer: Any, tokens: torch.Tensor) -> None:
    """Hand ``tokens`` to the streamer as a fresh CPU tensor (one host synchronisation on a GPU)."""
    streamer.put(tokens.detach().to("cpu", copy=True))
