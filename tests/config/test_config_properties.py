"""Property-based tests: round trips, alias equivalence, and nothing but ConfigError on garbage.

``test_fuzz_only_config_error`` is the config fuzz: 5,000 examples on every run (CI included), drawing
hostile objects (raising ``repr`` / ``__eq__`` / ``__hash__`` / ``__bool__`` / ``items``), bytes, tensors,
NaN/inf, huge ints, NUL bytes, non-string keys, deep nesting and self-reference, under every key of the schema.
"""

import json
import math
import os
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyinject.config import ConfigError, InferenceConfig, load_config
from policyinject.config.dtypes import DTYPE_SPELLINGS
from policyinject.config.keys import KEYS, NAMES
from policyinject.config.tp_plan import HF_TP_STYLES

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYERS = ["torch.nn.TransformerEncoderLayer", "torch.nn.modules.transformer.TransformerDecoderLayer",
          "torch.nn.modules.linear.Linear", "torch.nn.LayerNorm"]


def quiet_load(*args, **kwargs) -> InferenceConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(*args, **kwargs)


# -- valid configs ------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=6)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
names = st.text(alphabet="abcdxyz_.", min_size=1, max_size=10).filter(lambda s: s.strip("."))
opt_text = st.none() | st.text(max_size=8)
#: Paths: any text but the NUL byte (a path holding one is a ConfigError, tested with the hostile inputs).
path_text = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=8)
opt_path = st.none() | path_text


def opt(**fields):
    return st.fixed_dictionaries({}, optional=fields)


quant_params = dict(num_bits=st.sampled_from([4, 8]), q_type=st.sampled_from(["symmetric", "asymmetric"]),
                    q_groups=st.integers(1, 16))

canonical_configs = opt(
    replace_with_kernel_inject=st.booleans(),
    dtype=st.sampled_from(sorted(DTYPE_SPELLINGS)),
    tensor_parallel=opt(
        enabled=st.booleans(), tp_size=st.integers(1, 8), tp_grain_size=st.integers(1, 256),
        mpu=st.none(), tp_group=st.none(),
        tp_plan=st.none() | st.just("auto") | st.dictionaries(names, st.sampled_from(HF_TP_STYLES), max_size=3),
    ),
    enable_cuda_graph=st.booleans(),
    use_triton=st.booleans(),
    triton_autotune=st.booleans(),
    zero=json_objects,
    triangular_masking=st.booleans(),
    moe=opt(enabled=st.booleans(), ep_size=st.just(1), moe_experts=st.lists(st.integers(1, 64), min_size=1, max_size=3),
            type=st.just("standard"), ep_group=st.none(), ep_mp_group=st.none()),
    keep_module_on_host=st.booleans(),
    quant=opt(
        enabled=st.booleans(),
        activation=opt(enabled=st.just(False), **quant_params),  # true: an error (not implemented)
        weight=opt(enabled=st.booleans(), group_size=st.none() | st.integers(1, 512),
                   quantized_initialization=json_objects, post_init_quant=json_objects,
                   **{**quant_params, "q_type": st.sampled_from(["auto", "symmetric", "asymmetric"])}),
        qkv=opt(enabled=st.booleans()),
    ),
    checkpoint=st.none() | path_text.filter(bool) | json_objects,
    base_dir=path_text,
    set_empty_params=st.booleans(),
    save_mp_checkpoint_path=opt_path,
    checkpoint_config=opt(checkpoint_dir=opt_path, save_mp_checkpoint_path=opt_path, base_dir=opt_path),
    return_tuple=st.just(True),
    training_mp_size=st.integers(1, 8),
    injection_policy=st.none() | st.dictionaries(st.sampled_from(LAYERS), names | st.lists(names, min_size=1, max_size=3),
                                                 max_size=3),
    config=st.none() | json_objects,
    max_out_tokens=st.integers(1, 10**6),
    min_out_tokens=st.integers(1, 10**6),
    transposed_mode=st.booleans(),
    kernel_backend=st.sampled_from(["auto", "triton", "torch"]),
    max_batch_size=st.none() | st.integers(1, 512),
    cuda_graph_cache_size=st.integers(1, 64),
).map(lambda d: _make_valid(d))


def _make_valid(d: dict) -> dict:
    """Repair the cross-field rules a random draw may break."""
    d = json.loads(json.dumps(d))  # independent copy
    tp = d.get("tensor_parallel", {})
    if tp.get("tp_size", 1) > 1:
        d.pop("enable_cuda_graph", None)
        tp["enabled"] = True
    lo, hi = d.get("min_out_tokens", 1), d.get("max_out_tokens", 1024)
    if lo > hi:
        d["min_out_tokens"], d["max_out_tokens"] = hi, lo
    weight = d.get("quant", {}).get("weight", {})
    if weight.get("group_size") is not None:
        weight.pop("q_groups", None)
    if DTYPE_SPELLINGS[d.get("dtype", "auto")] == "int8":
        weight["num_bits"] = 8
        weight.pop("enabled", None)
        d.get("quant", {}).pop("enabled", None)
    return d


ALIASES = {s.path: s.aliases for s in KEYS if s.aliases and s.field}
DEPRECATED_HOME = {s.new: s.name for s in KEYS if s.new}


@st.composite
def respelled(draw, canonical: dict):
    """The same config, spelled with random aliases / deprecated keys / "auto" / a config-kwargs split."""
    d = json.loads(json.dumps(canonical))
    out: dict = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("tensor_parallel", "moe", "quant", "checkpoint_config"):
            section = {}
            for sub, sub_value in value.items():
                path = f"{key}.{sub}"
                if path in DEPRECATED_HOME and draw(st.booleans()):
                    out[DEPRECATED_HOME[path]] = sub_value
                    continue
                spellings = (sub, *ALIASES.get(path, ()))
                section[draw(st.sampled_from(spellings))] = sub_value
            if key == "moe" and set(section) == {"enabled"} and draw(st.booleans()):
                section = section["enabled"]
            elif not section and draw(st.booleans()):
                section = "auto"
            value = section
        spellings = (key, *ALIASES.get(key, ()))
        out[draw(st.sampled_from(spellings))] = value
    for spec in KEYS:  # "auto" for keys not given means the default
        if not spec.parent and not spec.auto_value and spec.name not in out and spec.field and draw(st.booleans()):
            if not any(a in out for a in spec.aliases):
                out[spec.name] = "auto"
    config, kwargs = {}, {}
    for key, value in out.items():
        where = draw(st.sampled_from(["config", "kwargs", "both"]))
        if where in ("config", "both"):
            config[key] = value
        if where in ("kwargs", "both"):
            kwargs["args" if key == "config" else key] = value
    if "config" in config and "args" in kwargs and config["config"] != kwargs["args"]:
        kwargs.pop("args")
    return config, kwargs


@SETTINGS
@given(canonical_configs)
def test_round_trip(d):
    cfg = quiet_load(d)
    assert quiet_load(cfg.to_dict()) == cfg
    assert quiet_load(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert quiet_load(cfg) == cfg


@SETTINGS
@given(st.data())
def test_aliases_and_splits_are_equivalent(data):
    canonical = data.draw(canonical_configs)
    config, kwargs = data.draw(respelled(canonical))
    assert quiet_load(config, **kwargs) == quiet_load(canonical)


# -- garbage ------------------------------------------------------------------------------------------

KNOWN = sorted({name for table in NAMES.values() for name in table})
garbage_keys = st.one_of(st.sampled_from(KNOWN), st.text(max_size=8).map(lambda s: "zzq" + s), st.just("auto"))
garbage_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10), st.just("auto"),
    st.sampled_from(sorted(DTYPE_SPELLINGS)), st.sampled_from(HF_TP_STYLES), st.sampled_from(LAYERS),
    st.text(alphabet="abc.", max_size=6).map(lambda s: "zzq" + s),
)
garbage = st.recursive(
    garbage_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(garbage_keys, c, max_size=5),
    max_leaves=25,
)
python_objects = st.sampled_from([
    object(), torch.float16, torch.float64, torch.nn.Linear, int, float("nan"), math.inf, b"bytes", (1, 2),
    {1, 2}, torch.ones(2), Path("no/such.json"), ["a", 1], {1: 2}, {"a": object()}, 10**30, -1,
])
garbage_with_objects = st.recursive(
    st.one_of(garbage_scalars, python_objects),
    lambda c: st.lists(c, max_size=3) | st.tuples(c, c) | st.dictionaries(st.one_of(garbage_keys, python_objects.filter(
        lambda o: o.__hash__ is not None)), c, max_size=4),
    max_leaves=15,
)


def only_config_errors(*args, **kwargs):
    try:
        cfg = quiet_load(*args, **kwargs)
    except ConfigError as e:
        assert e.problems and all(isinstance(p.path, str) and p.message for p in e.problems)
        assert str(e)
        return
    assert isinstance(cfg, InferenceConfig)
    json.dumps(cfg.to_dict(), allow_nan=True, default=lambda o: (_ for _ in ()).throw(AssertionError(o)))


@SETTINGS
@given(st.dictionaries(garbage_keys, garbage, max_size=8))
def test_garbage_mappings_raise_only_config_error(d):
    only_config_errors(d)


@SETTINGS
@given(garbage)
def test_garbage_of_any_shape(value):
    only_config_errors(value if not isinstance(value, str) else {"dtype": value})


@SETTINGS
@given(st.dictionaries(st.sampled_from([k for k in NAMES[""] if k != "config"]), garbage_with_objects, max_size=6),
       st.dictionaries(garbage_keys, garbage, max_size=4))
def test_garbage_kwargs_raise_only_config_error(kwargs, config):
    only_config_errors(config, **kwargs)


@SETTINGS
@given(canonical_configs, st.data())
def test_valid_configs_with_one_garbage_leaf(d, data):
    """A valid config with one known key set to garbage: still only ConfigError (or a valid config)."""
    key = data.draw(st.sampled_from(KNOWN))
    section = data.draw(st.sampled_from(sorted(NAMES)))
    value = data.draw(garbage_with_objects)
    target = d
    for part in [p for p in section.split(".") if p]:
        node = target.get(part)
        if not isinstance(node, dict):
            node = target[part] = {}
        target = node
    target[key] = value
    only_config_errors(d)


@SETTINGS
@given(st.data())
def test_schema_accepts_every_valid_spelling(data):
    """The JSON Schema accepts canonical output and the aliased / deprecated / "auto" spellings alike."""
    import pytest

    jsonschema = pytest.importorskip("jsonschema")
    from policyinject.config import json_schema

    validator = jsonschema.Draft202012Validator(json_schema())
    canonical = data.draw(canonical_configs)
    config, kwargs = data.draw(respelled(canonical))
    validator.validate(quiet_load(canonical).to_dict())
    validator.validate(config)
    validator.validate(kwargs)


# -- the config fuzz: hostile input of every kind under every key --------------------------------------

#: Examples of the config fuzz; at least 5,000 on every run (CI included). FUZZ_EXAMPLES overrides it locally.
FUZZ_EXAMPLES = int(os.environ.get("POLICYINJECT_CONFIG_FUZZ_EXAMPLES", "5000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


class _Raises:
    """An object whose chosen dunder methods raise."""

    def __init__(self, which: frozenset):
        self.which = which

    def _maybe(self, name):
        if name in self.which:
            raise RuntimeError(f"{name} raised")

    def __repr__(self):
        self._maybe("repr")
        return "<_Raises>"

    def __str__(self):
        self._maybe("str")
        return "_Raises"

    def __eq__(self, other):
        self._maybe("eq")
        return self is other

    def __hash__(self):
        self._maybe("hash")
        return id(self)

    def __bool__(self):
        self._maybe("bool")
        return True

    def __len__(self):
        self._maybe("len")
        return 0

    def __getattr__(self, name):
        if "getattr" in self.which and not name.startswith("__"):
            raise RuntimeError("getattr raised")
        raise AttributeError(name)


class _RaisingMapping(_Raises):
    def keys(self):
        self._maybe("keys")
        return ["tp_size"]

    def items(self):
        self._maybe("items")
        return [("tp_size", 2)]


class _RaisingStr(str):
    def __eq__(self, other):
        raise RuntimeError("str __eq__ raised")

    def __ne__(self, other):
        raise RuntimeError("str __ne__ raised")

    __hash__ = str.__hash__

    def strip(self, *args):
        raise RuntimeError("strip raised")


class _RaisingInt(int):
    def __eq__(self, other):
        raise RuntimeError("int __eq__ raised")

    def __lt__(self, other):
        raise RuntimeError("int __lt__ raised")

    __hash__ = int.__hash__


class _RaisingDict(dict):
    def items(self):
        raise RuntimeError("dict items raised")

    def __iter__(self):
        raise RuntimeError("dict iter raised")


DUNDERS = ["repr", "str", "eq", "hash", "bool", "len", "getattr", "keys", "items"]
raising_objects = st.builds(lambda w, m: (_RaisingMapping if m else _Raises)(frozenset(w)),
                            st.sets(st.sampled_from(DUNDERS), min_size=1), st.booleans())
nul_text = st.lists(st.sampled_from(["\0", "a", ".", "_", "é", "\n", "tp_size", "auto", "x" * 300]),
                    max_size=4).map("".join)
huge_ints = st.one_of(st.integers(min_value=2 ** 62, max_value=2 ** 70), st.integers(-(2 ** 70), -(2 ** 62)),
                      st.sampled_from([30, 5000, -4400]).map(lambda n: 10 ** n if n > 0 else -(10 ** -n)))
tensors = st.sampled_from([torch.ones(2), torch.tensor(float("nan")), torch.zeros(0), torch.tensor(3),
                           torch.tensor([True])])
hostile_leaves = st.one_of(
    garbage_scalars, python_objects, raising_objects, st.binary(max_size=6), tensors, huge_ints, nul_text,
    st.floats(), st.sampled_from([float("nan"), math.inf, -math.inf]), nul_text.map(_RaisingStr),
    st.integers(-3, 70).map(_RaisingInt), st.builds(lambda: _RaisingDict(tp_size=2)),
    st.sampled_from([int, object, torch.nn.Linear, torch.nn.TransformerEncoderLayer, type, Ellipsis, 1j]),
)
hostile_keys = st.one_of(garbage_keys, nul_text, st.integers(), st.none(), st.tuples(st.integers()),
                         st.floats(allow_nan=False), st.binary(max_size=3),
                         st.sampled_from([torch.nn.Linear, int]))


def _deep(kind: str, n: int):
    out = inner = ([] if kind == "list" else {})
    for _ in range(n):
        nxt = [] if kind == "list" else {}
        if kind == "list":
            inner.append(nxt)
        else:
            inner["a"] = nxt
        inner = nxt
    return out


#: Deeply nested values, built once and shared by every example (load_config never mutates its input).
DEEP = [_deep(kind, n) for kind in ("list", "dict") for n in (99, 100, 101, 1000, 5000)]


def _cyclic(value, where: int):
    """``value`` with a reference to one of its containers placed inside it (or a fresh self-loop)."""
    containers = []
    stack = [value]
    while stack and len(containers) < 50:
        v = stack.pop()
        if type(v) in (list, dict):
            containers.append(v)
            stack.extend(v.values() if type(v) is dict else v)
    if not containers:
        loop: dict = {"x": value}
        loop["self"] = loop
        return loop
    target = containers[where % len(containers)]
    owner = containers[(where * 7) % len(containers)]
    if type(owner) is dict:
        owner["cycle"] = target
    else:
        owner.append(target)
    return value


hostile = st.recursive(
    hostile_leaves,
    lambda c: st.lists(c, max_size=3) | st.tuples(c, c) | st.dictionaries(hostile_keys, c, max_size=3),
    max_leaves=8,
)
hostile_values = st.one_of(
    hostile,
    st.sampled_from(range(len(DEEP))).map(DEEP.__getitem__),
    st.builds(_cyclic, hostile, st.integers(0, 1000)),
)
LEAF_PATHS = [s.path for s in KEYS if not s.section] + [s.path for s in KEYS if s.section]


@st.composite
def hostile_configs(draw):
    """A config mapping with hostile values under real keys (every level), plus hostile keys of its own."""
    d: dict = {}
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(LEAF_PATHS))
        parts = path.split(".")
        node = d
        for part in parts[:-1]:
            child = node.get(part)
            if type(child) is not dict:
                child = node[part] = {}
            node = child
        node[parts[-1]] = draw(hostile_values)
    if draw(st.booleans()):
        try:
            d[draw(hostile_keys | nul_text.map(_RaisingStr))] = draw(hostile_values)
        except Exception:  # a key whose hash raises cannot go into a dict at all
            pass
    return d


@FUZZ
@given(st.data())
def test_fuzz_only_config_error(data):
    """load_config and to_dict: a valid config or a ConfigError naming problems, never another exception."""
    kind = data.draw(st.sampled_from(["mapping", "kwargs", "both", "whole", "path"]))
    config, kwargs = None, {}
    if kind in ("mapping", "both"):
        config = data.draw(hostile_configs())
    if kind in ("kwargs", "both"):
        kwargs = {k if k != "config" else "args": v
                  for k, v in data.draw(hostile_configs()).items() if type(k) is str and k.isidentifier()}
        kwargs.pop("config", None)
    if kind == "whole":
        config = data.draw(hostile_values)
    if kind == "path":
        config = data.draw(nul_text.map(lambda t: t + ".json") | nul_text.map(Path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = load_config(config, **kwargs)
    except ConfigError as e:
        assert e.problems and all(isinstance(p.path, str) and isinstance(p.message, str) for p in e.problems)
        assert str(e)
        # every cause is handled where it arises; the catch-all in parse_config is never what answers
        assert not any("could not be validated" in p.message for p in e.problems), e
        return
    assert isinstance(cfg, InferenceConfig)
    json.dumps(cfg.to_dict(), allow_nan=True, default=lambda o: (_ for _ in ()).throw(AssertionError(o)))
