"""Tensor-parallel ranks agree before anything changes: every rank present, the same config, the same model.

At setup each rank of a tensor-parallel group publishes a :class:`Fingerprint` -- the digest of every
normalised config key (:func:`policyinject.config.config_fingerprint`, per-node paths left out), the short
value of each key, and the model's structure (every module's class, every parameter's and buffer's shape and
dtype) -- and reads every other rank's, before any pass changes the model. Then:

- fingerprints that differ make **every** rank raise :class:`~policyinject.config.ConfigError`, one problem
  per differing config key (``tensor_parallel.tp_grain_size: rank 0: 64; rank 1: 32``) and one per differing
  model entry (``model: param model.layers.0.mlp.up_proj.weight: rank 0: [128, 64] float32; rank 1: ...``);
- a rank that has not published within ``tensor_parallel.setup_timeout_s`` makes every rank that did raise
  :class:`~policyinject.errors.RankTimeoutError` naming the missing global rank(s), with what each last
  started when it is known (a rank that ran ``init_inference`` with another ``tp_size`` announces it).

The exchange goes through the process group's key-value store (``set``/``check``/``get`` of one key per rank
and round), not through a collective: it works the same on NCCL and gloo, needs no device memory, and which
rank is missing is known (a timed-out collective cannot say). Rounds are counted per group in the store, so
the n-th ``init_inference`` of a group is compared with the n-th of every other rank of that group. After a
:class:`RankTimeoutError` the ranks of the group are out of step: restart the job.

When policyinject creates the default process group itself (torchrun variables, no group yet),
:func:`init_default_group` first meets every rank on the rendezvous store with the same timeout and names the
ranks that never came, then initialises the group on that store.

Example (the pure parts; the exchange itself needs several processes, see tests/tp/test_rank_agreement.py):
    >>> import torch
    >>> from policyinject.config import load_config
    >>> m = torch.nn.Linear(4, 2)
    >>> a = fingerprint(m, load_config(tp={"tp_size": 2, "tp_grain_size": 64}), (0, 1))
    >>> b = fingerprint(m, load_config(tp={"tp_size": 2, "tp_grain_size": 32}), (0, 1))
    >>> [str(p) for p in disagreements({0: a, 1: b})]
    ['tensor_parallel.tp_grain_size: differs between ranks: rank 0: 64; rank 1: 32']
    >>> Fingerprint.from_json(a.to_json()) == a
    True
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch

from .config import ConfigError, Problem, config_fingerprint, config_values
from .errors import RankTimeoutError

__all__ = ["DEFAULT_TIMEOUT_S", "Fingerprint", "agree", "announce", "disagreements", "fingerprint",
           "init_default_group", "model_fingerprint"]

#: Default of ``tensor_parallel.setup_timeout_s``.
DEFAULT_TIMEOUT_S = 300.0
#: At most this many differing model entries are listed (the count of the rest follows).
MAX_MODEL_LINES = 8
_NS = "policyinject/agree"


@attrs.frozen
class Fingerprint:
    """What one rank publishes: config digests and values, model structure, its TP size and group."""

    config: Mapping[str, str]
    shown: Mapping[str, str]
    model: Mapping[str, str]
    tp_size: int
    group: Tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({"config": dict(self.config), "shown": dict(self.shown), "model": dict(self.model),
                           "tp_size": self.tp_size, "group": list(self.group)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: "str | bytes") -> "Fingerprint":
        d = json.loads(text)
        return cls(d["config"], d["shown"], d["model"], int(d["tp_size"]), tuple(int(r) for r in d["group"]))


def model_fingerprint(model: torch.nn.Module) -> Dict[str, str]:
    """``{"module <name>": class, "param <name>": "[shape] dtype", "buffer <name>": ...}`` (no device).

    Example:
        >>> model_fingerprint(torch.nn.Linear(3, 2))["param weight"]
        '[2, 3] float32'
    """
    out: Dict[str, str] = {}
    for name, mod in model.named_modules():
        out[f"module {name or '(root)'}"] = f"{type(mod).__module__}.{type(mod).__qualname__}"
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            out[f"{kind} {name}"] = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"
    return out


def fingerprint(model: torch.nn.Module, config: Any, group: Sequence[int]) -> Fingerprint:
    """This rank's :class:`Fingerprint` of ``model`` (as given, before any change) and ``config``."""
    return Fingerprint(dict(config_fingerprint(config)), dict(config_values(config)), model_fingerprint(model),
                       int(config.tensor_parallel.tp_size), tuple(int(r) for r in group))


def _by_rank(values: Mapping[int, Optional[str]]) -> str:
    return "; ".join(f"rank {r}: {'(absent)' if v is None else v}" for r, v in sorted(values.items()))


def disagreements(records: Mapping[int, Fingerprint]) -> List[Problem]:
    """One :class:`Problem` per config key and per model entry that differs between ``records`` (global rank ->
    fingerprint), naming which rank had which value; empty when every rank agrees."""
    problems: List[Problem] = []
    keys = sorted(set().union(*(r.config for r in records.values())))
    for key in keys:
        if len({r.config.get(key) for r in records.values()}) > 1:
            problems.append(Problem(key, "differs between ranks: " + _by_rank(
                {rank: r.shown.get(key) for rank, r in records.items()})))
    entries = sorted(set().union(*(r.model for r in records.values())))
    differing = [e for e in entries if len({r.model.get(e) for r in records.values()}) > 1]
    for entry in differing[:MAX_MODEL_LINES]:
        problems.append(Problem("", f"the model differs between ranks at {entry}: " + _by_rank(
            {rank: r.model.get(entry) for rank, r in records.items()})))
    if len(differing) > MAX_MODEL_LINES:
        problems.append(Problem("", f"... and {len(differing) - MAX_MODEL_LINES} more model entries differ "
                                    "(each rank must build the same model before init_inference)"))
    return problems


# ------------------------------------------------------------------------------------------- the store
def _restart() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store reachable: the caller says so
        return None


def _wait_for(store: Any, keys: Mapping[int, str], timeout_s: float) -> Tuple[List[int], str]:
    """Poll until every key exists or the time is up: the ranks whose key is still missing, and why the store
    stopped answering ("" if it did not: the host of a TCP store, rank 0, may give up and exit first)."""
    deadline = time.monotonic() + timeout_s
    missing = sorted(keys)
    delay = 0.005
    while True:
        try:
            missing = [r for r in missing if not store.check([keys[r]])]
        except Exception as exc:  # noqa: BLE001 - the store's host is gone
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return missing, f"; the store stopped answering ({first}): its host, rank 0, gave up or exited"
        if not missing or time.monotonic() >= deadline:
            return missing, ""
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)


def _announcement(store: Any, rank: int) -> str:
    key = f"{_NS}/{_restart()}/latest/{rank}"
    try:
        if not store.check([key]):
            return ""
        d = json.loads(store.get(key))
    except Exception:  # noqa: BLE001 - only decorates the message
        return ""
    return (f" (its last init_inference used tensor_parallel.tp_size = {d['tp_size']}, tensor-parallel group "
            f"{d['group']})")


def _timeout_error(store: Any, me: int, missing: Sequence[int], group: Sequence[int], timeout_s: float,
                   what: str, here: str) -> RankTimeoutError:
    names = ", ".join(f"rank {r}{_announcement(store, r) if store is not None else ''}" for r in missing)
    return RankTimeoutError(
        f"{what}: rank {me} waited {timeout_s:g} s (tensor_parallel.setup_timeout_s) for the ranks of its "
        f"tensor-parallel group {list(group)}{here}; these did not arrive: {names}. Every rank must call "
        "init_inference with the same tensor_parallel.tp_size; check that rank's log for an earlier error or a "
        "hang.", missing=tuple(missing))


def announce(model: torch.nn.Module, config: Any) -> None:
    """Publish what this rank is building (no wait): a rank whose group waits for it in vain can then say
    what it did instead. Does nothing without an initialised multi-process default group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    store = _default_store()
    if store is None:
        return
    me = dist.get_rank()
    store.set(f"{_NS}/{_restart()}/latest/{me}",
              json.dumps({"tp_size": int(config.tensor_parallel.tp_size), "group": [me]}))


def agree(info: Any, model: torch.nn.Module, config: Any, timeout_s: Optional[float] = None) -> None:
    """Exchange fingerprints over ``info``'s group (a :class:`~policyinject.distributed.TPInfo`) and raise on
    disagreement or on missing ranks (see the module docstring). A group of one rank only announces."""
    import torch.distributed as dist

    if info.group is None or not dist.is_initialized():
        return
    timeout = float(timeout_s if timeout_s is not None else config.tensor_parallel.setup_timeout_s)
    group = tuple(int(r) for r in dist.get_process_group_ranks(info.group))
    me = dist.get_rank()
    mine = fingerprint(model, config, group)
    store = _default_store()
    if store is None:
        _agree_by_collective(info.group, me, mine)
        return
    root = f"{_NS}/{_restart()}"
    store.set(f"{root}/latest/{me}", json.dumps({"tp_size": mine.tp_size, "group": list(group)}))
    if len(group) < 2:
        return
    ns = f"{root}/{'-'.join(map(str, group))}"
    round_ = int(store.add(f"{ns}/round/{me}", 1))
    keys = {r: f"{ns}/{round_}/{r}" for r in group}
    store.set(keys[me], mine.to_json())
    missing, lost = _wait_for(store, {r: k for r, k in keys.items() if r != me}, timeout)
    if missing:
        raise _timeout_error(None if lost else store, me, missing, group, timeout, "tensor-parallel setup",
                             f" to exchange config and model fingerprints (setup #{round_}){lost}")
    records = {r: (mine if r == me else Fingerprint.from_json(store.get(keys[r]))) for r in group}
    _settle(store, ns, round_, me, group, timeout)
    problems = disagreements(records)
    if problems:
        raise ConfigError([Problem("", f"the ranks of tensor-parallel group {list(group)} disagree; nothing was "
                                       "changed (every rank raises this error):"), *problems])


def _settle(store: Any, ns: str, round_: int, me: int, group: Sequence[int], timeout_s: float) -> None:
    """After reading every fingerprint: say so, and on global rank 0 -- the host of an ``env://`` TCP store --
    wait until every rank of the group has read too, so that rank 0 raising and exiting at once cannot take
    the store away from a rank still reading (that rank would report rank 0 missing instead of the real
    disagreement). The wait is bounded by ``timeout_s``; a rank that read but never says so only delays rank 0.
    Keys of round - 2 are dropped: every rank finished reading them before it started round - 1."""
    store.set(f"{ns}/{round_}/read/{me}", "1")
    if me == 0:
        _wait_for(store, {r: f"{ns}/{round_}/read/{r}" for r in group if r != me}, timeout_s)
    if round_ > 2:
        for key in (f"{ns}/{round_ - 2}/{me}", f"{ns}/{round_ - 2}/read/{me}"):
            try:
                store.delete_key(key)
            except Exception:  # noqa: BLE001 - a store without delete keeps a few kilobytes more
                pass


def _agree_by_collective(group: Any, me: int, mine: Fingerprint) -> None:
    """Fallback without a reachable store: ``all_gather_object`` (no timeout can be enforced; warned)."""
    import warnings

    import torch.distributed as dist

    warnings.warn("policyinject: the process group's store is not reachable, so the tensor-parallel agreement "
                  "check runs as a collective without tensor_parallel.setup_timeout_s", RuntimeWarning,
                  stacklevel=3)
    parts: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine.to_json(), group=group)
    ranks = dist.get_process_group_ranks(group)
    problems = disagreements({int(r): Fingerprint.from_json(p) for r, p in zip(ranks, parts)})
    if problems:
        raise ConfigError([Problem("", f"the ranks of tensor-parallel group {list(ranks)} disagree; nothing was "
                                       "changed (every rank raises this error):"), *problems])


def init_default_group(backend: str, timeout_s: float, environ: Optional[Mapping[str, str]] = None) -> None:
    """Initialise the default process group from the torchrun variables, after meeting every rank on the
    rendezvous store within ``timeout_s`` (else :class:`RankTimeoutError` naming the ranks that never came)."""
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    timeout = timedelta(seconds=float(timeout_s))
    is_master = rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    everyone = tuple(range(world))
    try:
        store = dist.TCPStore(host, port, world, is_master, timeout, wait_for_workers=False, multi_tenant=True)
    except Exception as exc:  # noqa: BLE001
        if is_master:
            raise RuntimeError(f"rank 0 could not host the rendezvous store on {host}:{port}: {exc}") from exc
        raise _timeout_error(None, rank, (0,), everyone, float(timeout_s), "process-group setup",
                             f" (the store at MASTER_ADDR:MASTER_PORT = {host}:{port}, hosted by rank 0, did not "
                             f"answer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    ns = f"{_NS}/{_restart()}/setup"
    store.set(f"{ns}/{rank}", "1")
    missing, lost = _wait_for(store, {r: f"{ns}/{r}" for r in everyone if r != rank}, float(timeout_s))
    if missing:
        raise _timeout_error(None if lost else store, rank, missing, everyone, float(timeout_s),
                             "process-group setup", f" at the rendezvous on {host}:{port}{lost}")
    dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world)
