"""Sharded loading and saving for tensor parallelism, without N full copies of the model.

A model created on the meta device (``with torch.device("meta"): model = Cls(config)``, or
``low_cpu_mem_usage``) plus ``checkpoint=`` a local safetensors directory: the tensor-parallel pass asks a
:class:`SafetensorsSource` for exactly the rows/columns this rank keeps, and the source reads them with
``safe_open(...).get_slice`` -- one tensor at a time, the file closed (unmapped) after each -- so the peak
host memory of a rank is about its shards plus one tensor. Everything that is not sharded (norms, position
embeddings, replicated linears) is then read whole; non-persistent buffers a meta model lacks (rotary
``inv_freq``) are recomputed by re-creating the module from its ``config``.

``save_mp_checkpoint_path``: after sharding, every rank writes its shards (keyed by the ORIGINAL tensor
names) to ``tp_rank_RR_of_NN.safetensors``, rank 0 writes the rest to ``non_tp.safetensors``, plus
``policyinject_tp.json`` (tp_size, grain, dtype, files) and the model's ``config.json``. A later
``init_inference(meta_model, tensor_parallel={"tp_size": N}, checkpoint=that_dir)`` on the same ``tp_size``
loads its own file directly (:class:`PreShardedSource`); a different ``tp_size`` is a :class:`PlanError`.

Peak host memory is measured with ``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs``)
or ``resource.getrusage`` where that is unavailable, and reported in
the plan's tensor-parallel layout (``plan.tensor_parallel.load``).

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp(); save_file({"w": torch.arange(12.).view(3, 4)}, os.path.join(d, "model.safetensors"))
    >>> src = SafetensorsSource.from_files(safetensors_files(d))
    >>> src.read("w", dim=1, index=(1, 2, 3)).tolist()
    [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0], [9.0, 10.0, 11.0]]
"""

from __future__ import annotations

import glob
import json
import os
import resource
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
from torch import nn

from .checkpoint_headers import check_checkpoint, read_header
from .errors import PlanError
from .plan import Action
from .tp_split import runs

MANIFEST = "policyinject_tp.json"
NON_TP_FILE = "non_tp.safetensors"
FORMAT = "policyinject-tp"


def rank_file(rank: int, tp_size: int) -> str:
    """File name of one rank's shards.

    Example:
        >>> rank_file(1, 4)
        'tp_rank_01_of_04.safetensors'
    """
    return f"tp_rank_{rank:02d}_of_{tp_size:02d}.safetensors"


# ------------------------------------------------------------------------------------------ memory meter
def rss_status() -> Dict[str, int]:
    """Current and peak resident set size in bytes (``VmRSS``, ``VmHWM``); getrusage as a fallback.

    Example:
        >>> sorted(rss_status())
        ['hwm', 'rss']
    """
    try:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["hwm"] = int(line.split()[1]) * 1024
        if len(out) == 2:
            return out
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss": peak, "hwm": peak}


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring this process's peak RSS above the RSS at entry.

    Example:
        >>> with PeakMemory(enabled=True) as m:
        ...     x = torch.ones(1 << 20)
        >>> m.report["peak_above_baseline_mb"] >= 0
        True
    """

    def __init__(self, enabled: bool = True, full_bytes: int = 0) -> None:
        self.enabled = enabled
        self.full_bytes = full_bytes
        self.report: Dict[str, Any] = {}
        self.bytes_read = 0

    def __enter__(self) -> "PeakMemory":
        if self.enabled:
            self._reset = reset_peak()
            self._base = rss_status()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        now = rss_status()
        mb = 1 << 20
        self.report = {
            "baseline_rss_mb": round(self._base["rss"] / mb, 1),
            "peak_rss_mb": round(now["hwm"] / mb, 1),
            "peak_above_baseline_mb": round(max(0, now["hwm"] - self._base["rss"]) / mb, 1),
            "bytes_read_mb": round(self.bytes_read / mb, 1),
            "full_checkpoint_mb": round(self.full_bytes / mb, 1),
            "peak_is_exact": bool(self._reset),
        }


# ------------------------------------------------------------------------------------------ sources
def _slice_stored(ps: Any) -> Tuple[int, Optional[tuple]]:
    """The stored dim and index of a ParamSlice (GPT-2 Conv1D weights are stored [in, out])."""
    dim = ps.dim
    if ps.transposed:
        dim = 1 - dim
    return dim, ps.index


class ModuleSource:
    """Slices taken from the model's own (in-memory) tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.tensors[name] = p
        for name, b in model.named_buffers(remove_duplicate=False):
            self.tensors[name] = b
        self.meter = PeakMemory(enabled=False)

    def device_for(self, ref: torch.Tensor) -> torch.device:
        return ref.device

    def get(self, ps: Any, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = self.tensors[ps.name].detach()
        dim, index = _slice_stored(ps)
        if index is not None:
            t = t.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=t.device))
        if ps.transposed:
            t = t.t()
        return t.contiguous()

    def has(self, name: str) -> bool:
        return False  # nothing to materialize: the model already holds its tensors

    def release(self, *names: Optional[str]) -> None:
        """Drop references to originals that have been sharded, so they can be freed as apply goes."""
        for n in names:
            if n is not None:
                self.tensors.pop(n, None)


class NamedSource:
    """What every by-name tensor source shares: one device, names resolved directly or through ``aliases``
    (tied tensors stored once). A subclass gives ``device``, ``aliases`` and ``_names()``."""

    device: torch.device
    aliases: Dict[str, str]

    def _names(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def device_for(self, ref: torch.Tensor) -> torch.device:
        return self.device

    def resolve(self, name: str) -> Optional[str]:
        names = self._names()
        if name in names:
            return name
        alias = self.aliases.get(name)
        return alias if alias in names else None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def read(self, name: str, dim: int = 0, index: Optional[Sequence[int]] = None) -> torch.Tensor:
        raise NotImplementedError

    def get(self, ps: Any, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        dim, index = _slice_stored(ps)
        t = self.read(ps.name, dim, index)
        if ps.transposed:
            t = t.t()
        return t.contiguous()


class SafetensorsSource(NamedSource):
    """Reads tensors and slices of tensors from safetensors files, one tensor at a time."""

    def __init__(self, files: Mapping[str, str], device: torch.device, aliases: Optional[Mapping[str, str]] = None,
                 meter: Optional[PeakMemory] = None) -> None:
        self.files = dict(files)  # tensor name -> file
        self.device = device
        self.aliases = dict(aliases or {})
        self.meter = meter or PeakMemory(enabled=False)

    @classmethod
    def from_files(cls, paths: Iterable[str], device: Any = "cpu", **kwargs: Any) -> "SafetensorsSource":
        from safetensors import safe_open

        files: Dict[str, str] = {}
        for path in paths:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    files[k] = path
        return cls(files, torch.device(device), **kwargs)

    def _names(self) -> Mapping[str, Any]:
        return self.files

    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in set(self.files.values()))

    def read(self, name: str, dim: int = 0, index: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Read ``index`` along ``dim`` of tensor ``name`` (the whole tensor when ``index`` is None)."""
        from safetensors import safe_open

        key = self.resolve(name)
        if key is None:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        with safe_open(self.files[key], framework="pt") as f:
            sl = f.get_slice(key)
            if index is None:
                t = sl[:]
            else:
                nd = len(sl.get_shape())
                pieces = []
                for start, n in runs(index):
                    sel = [slice(None)] * nd
                    sel[dim] = slice(start, start + n)
                    pieces.append(sl[tuple(sel)])
                t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
            t = t.clone()  # own the memory: no view into the file mapping outlives this read
        self.meter.bytes_read += t.numel() * t.element_size()
        return t


class PreShardedSource(SafetensorsSource):
    """A directory written by ``save_mp_checkpoint_path``: this rank's file holds its shards already."""

    def __init__(self, files: Mapping[str, str], device: torch.device, sharded: Iterable[str], **kwargs: Any) -> None:
        super().__init__(files, device, **kwargs)
        self.sharded = set(sharded)

    def get(self, ps: Any, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        if ps.name not in self.sharded:
            return super().get(ps, like)
        t = self.read(ps.name)
        if ps.index is not None:
            dim = ps.dim
            if t.shape[dim] != len(ps.index):
                raise PlanError(f"pre-sharded checkpoint: {ps.name} has {t.shape[dim]} entries along dim {dim}, this "
                                f"rank expects {len(ps.index)} (was it saved with another tp_size or grain?)")
        return t.contiguous()


def safetensors_files(directory: str) -> List[str]:
    """The safetensors files of a checkpoint directory (``*.safetensors``, sorted)."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise PlanError(f"checkpoint directory {directory!r} has no *.safetensors files")
    return files


# ------------------------------------------------------------------------------------------ planning
@attrs.frozen
class CheckpointSpec:
    """What the ``checkpoint`` config resolved to."""

    kind: str  # "safetensors" | "pre_sharded" | "random"
    files: Tuple[str, ...]
    directory: str = ""
    manifest: Optional[Mapping[str, Any]] = None


def resolve_checkpoint(value: Any, base_dir: str = "") -> Optional[CheckpointSpec]:
    """Turn ``config.checkpoint`` (a directory, a DeepSpeed-style JSON description or its mapping) into files.

    Example:
        >>> resolve_checkpoint(None) is None
        True
    """
    if not value:
        return None
    desc: Optional[Mapping[str, Any]] = None
    if isinstance(value, (str, os.PathLike)):
        path = os.path.join(base_dir, str(value)) if base_dir and not os.path.isabs(str(value)) else str(value)
        if os.path.isdir(path):
            manifest_path = os.path.join(path, MANIFEST)
            if os.path.exists(manifest_path):
                with open(manifest_path) as f:
                    manifest = json.load(f)
                return CheckpointSpec("pre_sharded", (), path, manifest)
            return CheckpointSpec("safetensors", tuple(safetensors_files(path)), path)
        if path.endswith(".safetensors") and os.path.exists(path):
            return CheckpointSpec("safetensors", (path,), os.path.dirname(path))
        if not os.path.exists(path):
            raise PlanError(f"checkpoint {value!r}: no such file or directory")
        with open(path) as f:
            desc = json.load(f)
        base_dir = desc.get("base_dir") or base_dir or os.path.dirname(path)
    else:
        desc = dict(value)
        if desc.get("type") == "random":
            return _random_spec(desc)
        base_dir = desc.get("base_dir") or base_dir
    names = desc.get("checkpoints")
    if isinstance(names, Mapping):
        names = list(names.get("non_tp", [])) + list(names.get("tp", []))
    if not names:
        raise PlanError("checkpoint description has no 'checkpoints' list")
    files = tuple(os.path.join(base_dir, n) if base_dir and not os.path.isabs(n) else n for n in names)
    bad = [f for f in files if not f.endswith(".safetensors")]
    if bad:
        raise PlanError(f"checkpoint: only safetensors files can be read slice by slice; got {bad[0]!r}")
    return CheckpointSpec("safetensors", files, base_dir)


def plan_checkpoint(ctx: Any, tp_size: int, shards: Sequence[Any] = ()) -> Optional[Action]:
    """The ``load_checkpoint`` action when ``config.checkpoint`` is set.

    Checks a pre-sharded ``tp_size``, then -- from the safetensors headers alone, before anything changes --
    that every tensor apply will read exists with the model's shape and kind (:func:`check_checkpoint`);
    ``shards`` are the planned :class:`~policyinject.passes.tp_linears.Shard` payloads.
    """
    cfg = ctx.config
    spec = resolve_checkpoint(cfg.checkpoint, cfg.base_dir or "")
    if spec is None:
        return None
    details: Dict[str, Any] = {"format": spec.kind, "dir": spec.directory}
    if spec.kind == "random":
        details.update(seed=spec.manifest["seed"], std=spec.manifest["std"])
        return Action("tensor_parallel", "", type(ctx.model).__name__, "load_checkpoint", details, spec)
    if spec.kind == "pre_sharded":
        saved = int(spec.manifest.get("tp_size", -1))
        if saved != tp_size:
            raise PlanError(f"checkpoint {spec.directory!r} was saved with tensor_parallel.tp_size={saved}; this run "
                            f"asks for tp_size={tp_size}. Load the original checkpoint to re-shard")
        details["tp_size"] = saved
        man = spec.manifest
        rank = getattr(ctx.tp, "rank", 0) or 0
        files = [os.path.join(spec.directory, man["files"]["non_tp"]),
                 os.path.join(spec.directory, man["files"]["ranks"][rank])]
        sharded = set(man.get("sharded", []))
        extra_aliases = dict(man.get("aliases", {}))
    else:
        details["files"] = len(spec.files)
        files, sharded, extra_aliases = list(spec.files), set(), {}
    headers: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for path in files:
        if not os.path.exists(path):
            raise PlanError(f"checkpoint file {path!r} does not exist")
        headers.update(read_header(path))
    required = {ps.name for sh in shards if sh.tie_to is None for ps in (sh.weight, sh.bias) if ps is not None}
    problems, unexpected = check_checkpoint(ctx.model, headers, required, sharded, extra_aliases)
    if problems:
        raise PlanError([f"checkpoint {spec.directory or files[0]!r}: {p}" for p in problems])
    if unexpected:
        ctx.plan.warn(f"checkpoint {spec.directory or files[0]!r} has {len(unexpected)} tensors the model does not "
                      f"use (not loaded): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        details["unexpected"] = len(unexpected)
    return Action("tensor_parallel", "", type(ctx.model).__name__, "load_checkpoint", details, spec)


def _random_spec(desc: Mapping[str, Any]) -> CheckpointSpec:
    """``{"type": "random", "seed": 0, "std": 0.02}``: seeded random tensors made on the device, per name."""
    unknown = sorted(set(desc) - {"type", "seed", "std"})
    if unknown:
        raise PlanError(f"checkpoint {{'type': 'random'}} takes the keys seed and std; unknown: {unknown}")
    seed, std = desc.get("seed", 0), desc.get("std", 0.02)
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(std, (int, float)) or std <= 0:
        raise PlanError(f"checkpoint {{'type': 'random'}}: seed must be an int and std a positive number; "
                        f"got seed={seed!r}, std={std!r}")
    return CheckpointSpec("random", (), "", {"seed": int(seed), "std": float(std)})


def _aliases(model: nn.Module) -> Dict[str, str]:
    """Tied tensor names -> the other names of the same tensor (a tied head is often absent from files)."""
    groups: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out: Dict[str, str] = {}
    for names in groups.values():
        for n in names:
            for other in names:
                if other != n:
                    out.setdefault(n, other)
    return out


def open_source(ctx: Any, action: Optional[Action]) -> Tuple[Any, PeakMemory]:
    """The tensor source for apply: the model itself, or the checkpoint files (with a memory meter)."""
    if action is None:
        src = ModuleSource(ctx.model)
        return src, src.meter
    spec: CheckpointSpec = action.payload
    device = ctx.device or torch.device("cpu")
    if ctx.config.keep_module_on_host:
        device = torch.device("cpu")
    aliases = _aliases(ctx.model)
    if spec.kind == "random":
        from .testing.random_weights import RandomSource

        src = RandomSource.for_model(ctx.model, device, seed=spec.manifest["seed"], std=spec.manifest["std"])
        return src, src.meter
    if spec.kind == "pre_sharded":
        tp = ctx.tp
        man = spec.manifest
        mine = os.path.join(spec.directory, man["files"]["ranks"][tp.rank])
        non_tp = os.path.join(spec.directory, man["files"]["non_tp"])
        base = SafetensorsSource.from_files([non_tp, mine], device)
        src = PreShardedSource(base.files, device, man.get("sharded", []), aliases={**aliases, **man.get("aliases", {})})
    else:
        src = SafetensorsSource.from_files(spec.files, device, aliases=aliases)
    src.meter = PeakMemory(enabled=True, full_bytes=src.nbytes())
    return src, src.meter


def materialize_rest(ctx: Any, source: Any, built: Iterable[str] = ()) -> None:
    """Load every tensor that tensor parallelism did not shard from the checkpoint (ties preserved).

    ``built`` lists the paths of the parallel modules apply created; their tensors are already loaded.

    Meta buffers that the checkpoint lacks (non-persistent, such as rotary ``inv_freq``) are recomputed by
    re-creating their module from its ``config``. Anything still on the meta device is a :class:`PlanError`.
    """
    if isinstance(source, ModuleSource):
        return
    model = ctx.model
    loaded: Dict[int, torch.Tensor] = {}
    missing: List[str] = []
    skip = tuple(built)
    for mpath, mod in model.named_modules():
        if any(mpath == b or mpath.startswith(b + ".") for b in skip):
            continue
        for kind in ("_parameters", "_buffers"):
            table = getattr(mod, kind)
            for name, t in list(table.items()):
                if t is None:
                    continue
                full = f"{mpath}.{name}" if mpath else name
                if id(t) in loaded:
                    new = loaded[id(t)]
                elif source.has(full):
                    data = source.read(full).to(device=source.device, dtype=t.dtype)
                    new = nn.Parameter(data, requires_grad=False) if kind == "_parameters" else data
                elif t.device.type == "meta" and kind == "_buffers":
                    data = _recompute_buffer(mod, name)
                    if data is None:
                        missing.append(full)
                        continue
                    new = data.to(device=source.device)
                elif t.device.type == "meta":
                    missing.append(full)
                    continue
                else:
                    continue
                loaded[id(t)] = new
                table[name] = new
    if missing:
        raise PlanError(f"checkpoint lacks {len(missing)} tensors the model needs: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))


def _recompute_buffer(mod: nn.Module, name: str) -> Optional[torch.Tensor]:
    config = getattr(mod, "config", None)
    if config is None:
        return None
    try:
        with torch.device("cpu"):
            fresh = type(mod)(config)
    except Exception:
        return None
    buf = fresh._buffers.get(name)
    return None if buf is None else buf.to(getattr(mod, name).dtype if getattr(mod, name).is_floating_point() else buf.dtype)


# ------------------------------------------------------------------------------------------ saving
def save_sharded(ctx: Any, directory: str, shards: Mapping[str, torch.Tensor], built: Mapping[str, nn.Module]) -> None:
    """Write this rank's shards (and, on rank 0, the rest, the manifest and the model config)."""
    from safetensors.torch import save_file

    tp = ctx.tp
    if tp.dp_rank != 0:
        return
    os.makedirs(directory, exist_ok=True)
    mine = {k: v.detach().contiguous().cpu() for k, v in shards.items()}
    save_file(mine, os.path.join(directory, rank_file(tp.rank, tp.world_size)), metadata={"format": "pt"})
    if tp.rank == 0:
        prefixes = tuple(p + "." for p in built)
        rest: Dict[str, torch.Tensor] = {}
        seen: Dict[int, str] = {}
        aliases: Dict[str, str] = {}
        for name, t in ctx.model.state_dict(keep_vars=True).items():
            if name.startswith(prefixes) or t is None:
                continue
            if id(t) in seen:
                aliases[name] = seen[id(t)]
                continue
            seen[id(t)] = name
            rest[name] = t.detach().contiguous().cpu()
        save_file(rest, os.path.join(directory, NON_TP_FILE), metadata={"format": "pt"})
        dtype = next((str(t.dtype) for t in mine.values()), "")
        manifest = {
            "format": FORMAT, "version": 1, "tp_size": tp.world_size,
            "tp_grain_size": int(ctx.config.tensor_parallel.tp_grain_size),
            "dtype": dtype, "model_class": type(ctx.model).__name__,
            "files": {"non_tp": NON_TP_FILE, "ranks": [rank_file(r, tp.world_size) for r in range(tp.world_size)]},
            "sharded": sorted(shards), "aliases": aliases,
        }
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        cfg = getattr(ctx.model, "config", None)
        if cfg is not None and hasattr(cfg, "to_json_file"):
            cfg.to_json_file(os.path.join(directory, "config.json"))
    if tp.world_size > 1 and tp.group is not None:
        import torch.distributed as dist

        dist.barrier(group=tp.group)
