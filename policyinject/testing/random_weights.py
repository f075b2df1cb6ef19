"""Seeded random weights made tensor by tensor, where they are needed: a checkpoint that is never on disk.

:class:`RandomSource` has the interface of :class:`policyinject.checkpoint.SafetensorsSource`, so
``init_inference(meta_model, checkpoint={"type": "random", "seed": 0}, ...)`` materialises every tensor of a model
built on the meta device directly on the target device, one at a time -- and, with ``dtype="int8"`` or 4-bit
``quant``, quantizes each linear as soon as it is made. That is how a model larger than the device's 16-bit
capacity (a Llama-3-70B shape on one GPU) is built for benchmarking without a 140 GB checkpoint.
:func:`write_random_checkpoint` writes the same tensors to a sharded safetensors checkpoint on disk, one shard
in host memory at a time.

Each tensor depends only on ``(seed, name)``: 2-D and larger tensors are ``N(0, std²)``, 1-D weights of norms
are ``1 + N(0, std²)``, biases and integer tensors zeros.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    >>> src = RandomSource.for_model(model, "cpu", seed=1)
    >>> src.read("0.weight").shape, src.read("1.weight").mean().item() > 0.9
    (torch.Size([3, 4]), True)
    >>> torch.equal(src.read("0.weight"), RandomSource.for_model(model, "cpu", seed=1).read("0.weight"))
    True
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import NamedSource, PeakMemory, _aliases

__all__ = ["RandomSource", "write_random_checkpoint"]


class RandomSource(NamedSource):
    """Seeded random tensors by name, with the model's shapes and dtypes (see the module docstring)."""

    def __init__(self, shapes: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]], device: Any, seed: int = 0,
                 std: float = 0.02, aliases: Optional[Mapping[str, str]] = None) -> None:
        self.shapes = dict(shapes)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.std = float(std)
        self.aliases = dict(aliases or {})
        self.meter = PeakMemory(enabled=False)

    @classmethod
    def for_model(cls, model: nn.Module, device: Any, seed: int = 0, std: float = 0.02) -> "RandomSource":
        """Every parameter and persistent buffer of ``model`` (meta tensors welcome), by state-dict name."""
        shapes = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict(keep_vars=True).items() if t is not None}
        return cls(shapes, device, seed, std, _aliases(model))

    def _names(self) -> Mapping[str, Any]:
        return self.shapes

    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in self.shapes.values())

    def make(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (on this source's device, in the model's dtype)."""
        key = self.resolve(name)
        if key is None:
            raise KeyError(f"random checkpoint: the model has no tensor {name!r}")
        shape, dtype = self.shapes[key]
        if not dtype.is_floating_point or key.endswith("bias"):
            return torch.zeros(shape, dtype=dtype, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63))
        t = torch.randn(shape, generator=gen, dtype=dtype, device=self.device)
        t.mul_(self.std)
        if len(shape) == 1:
            t.add_(1.0)  # norm weights near one
        return t

    def read(self, name: str, dim: int = 0, index: Optional[Sequence[int]] = None) -> torch.Tensor:
        t = self.make(name)
        if index is not None and list(index) != list(range(t.shape[dim])):  # no copy of a whole tensor
            t = t.index_select(dim, torch.as_tensor(list(index), dtype=torch.long, device=t.device))
        self.meter.bytes_read += t.numel() * t.element_size()
        return t


def write_random_checkpoint(model: nn.Module, directory: str, seed: int = 0, std: float = 0.02,
                            dtype: Optional[torch.dtype] = None, shard_bytes: int = 4 << 30,
                            device: Any = "cpu") -> Dict[str, str]:
    """Write ``model``'s tensors (a meta model is fine) as seeded random values to a sharded safetensors
    checkpoint in ``directory`` (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``),
    holding at most one shard in host memory. Tied tensors are written once. Returns name -> file.
    ``device``: where the values are drawn (a GPU is faster; the values then match
    ``RandomSource`` on that device type, not the CPU's).

    Example:
        >>> import tempfile
        >>> files = write_random_checkpoint(torch.nn.Linear(4, 2), tempfile.mkdtemp(), shard_bytes=16)
        >>> sorted(files), len(set(files.values()))
        (['bias', 'weight'], 2)
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    src = RandomSource.for_model(model, device, seed, std)
    if dtype is not None:
        src.shapes = {n: (s, dtype if d.is_floating_point else d) for n, (s, d) in src.shapes.items()}
    seen: set = set()
    names = []
    for n, t in model.state_dict(keep_vars=True).items():
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            names.append(n)
    groups, current, size = [], [], 0
    for n in names:
        shape, d = src.shapes[n]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=d).element_size()
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    if current:
        groups.append(current)
    weight_map: Dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: src.make(n).cpu() for n in group}, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return weight_map
