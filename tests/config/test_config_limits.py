"""Bounded cost and nothing but ConfigError: hostile objects, deep and cyclic input, huge files, duplicate keys."""

from __future__ import annotations

import json
import math
import time
import warnings

import pytest
import torch

from policyinject.cli import main
from policyinject.config import ConfigError, InferenceConfig, load_config, read_config_file
from policyinject.config.inputs import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from policyinject.config.keys import KEYS

#: Generous: each case takes well under a second on an idle core; CI machines are shared.
TIME_LIMIT_S = 5.0


def problems(*args, **kwargs) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as e:
            load_config(*args, **kwargs)
    assert str(e.value)
    return [(p.path, p.message) for p in e.value.problems]


# -- hostile objects ------------------------------------------------------------------------------------

class RaisingRepr:
    def __repr__(self):
        raise RuntimeError("repr")


class RaisingEq:
    def __eq__(self, other):
        raise RuntimeError("eq")

    __hash__ = object.__hash__


class RaisingBool:
    def __bool__(self):
        raise RuntimeError("bool")


class RaisingStr(str):
    def __eq__(self, other):
        raise RuntimeError("str eq")

    def __str__(self):
        raise RuntimeError("str")

    __hash__ = str.__hash__


class RaisingInt(int):
    def __lt__(self, other):
        raise RuntimeError("lt")

    def __eq__(self, other):
        raise RuntimeError("int eq")

    __hash__ = int.__hash__


class RaisingItems:
    def items(self):
        raise RuntimeError("items")

    def keys(self):
        return []


class RaisingGetattr:
    def __getattr__(self, name):
        raise RuntimeError("getattr")


class RaisingDict(dict):
    def items(self):
        raise RuntimeError("items")

    def __len__(self):
        raise RuntimeError("len")


def _deep_list(n: int) -> list:
    out = inner = []
    for _ in range(n):
        inner.append([])
        inner = inner[0]
    return out


def _deep_dict(n: int) -> dict:
    out = inner = {}
    for _ in range(n):
        inner["a"] = {}
        inner = inner["a"]
    return out


def _self_dict() -> dict:
    d: dict = {}
    d["me"] = d
    return d


def _self_list() -> list:
    x: list = []
    x.append(x)
    return x


HOSTILE = [
    RaisingRepr(), RaisingEq(), RaisingBool(), RaisingStr("auto"), RaisingStr("fp16"), RaisingStr("a.B"),
    RaisingInt(2), RaisingItems(), RaisingGetattr(), RaisingDict(a=1), b"bytes", bytearray(b"x"), torch.ones(2),
    torch.tensor(float("nan")), float("nan"), -math.inf, 10 ** 5000, -(10 ** 40), "nul\0byte", "",
    _deep_list(5000), _deep_dict(5000), _self_dict(), _self_list(), {1: 2}, {(1, 2): 3}, {None: 1}, set(),
    frozenset({1}), type, int, object, torch.float64, Ellipsis, NotImplemented, 1j, range(3),
]
LEAF_PATHS = [s.path for s in KEYS if not s.section]


def _nested(path: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


@pytest.mark.parametrize("path", LEAF_PATHS)
def test_every_key_with_every_hostile_value_raises_only_config_error(path):
    for value in HOSTILE:
        for config, kwargs in ((_nested(path, value), {}), ({}, _nested(path, value))):
            if "config" in kwargs:
                kwargs = {"args": kwargs["config"]}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cfg = load_config(config, **kwargs)
            except ConfigError as e:
                assert e.problems and str(e)
                assert not any("could not be validated" in p.message for p in e.problems), (path, e)
                continue
            json.dumps(cfg.to_dict(), allow_nan=True)  # no RecursionError, no live object left in


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__)
def test_hostile_values_as_the_whole_config_or_a_key(value):
    for source in (value, {"injection_policy": {"a.B": value}}, {"zero": {"k": value}}):
        try:
            load_config(source)
        except ConfigError as e:
            assert not any("could not be validated" in p.message for p in e.problems)
    try:
        key_dict = {value: 1}
    except TypeError:
        return
    with pytest.raises(ConfigError):
        load_config(key_dict)


def test_deep_and_cyclic_values_name_the_key():
    ((path, message),) = problems({"zero": _self_dict()})
    assert path == "zero.me" and "refers to itself" in message
    ((path, message),) = problems(config=None, args={"x": _deep_list(5000)})
    assert path.startswith("args.x[0][0]") and f"more than {MAX_DEPTH} levels" in message
    ((path, message),) = problems(zero=_deep_dict(5000))
    assert path.startswith("zero.a.a.a") and "levels deep" in message


def test_config_built_directly_cannot_hold_cycles_so_to_dict_never_recurses():
    with pytest.raises(ConfigError, match="refers to itself"):
        InferenceConfig(zero=_self_dict())
    with pytest.raises(ConfigError, match="levels deep"):
        InferenceConfig(config=_deep_dict(5000))
    json.dumps(InferenceConfig(zero=_deep_dict(50)).to_dict())


def test_short_messages_for_huge_values():
    ((_, message),) = problems(dtype="x" * 1_000_000)
    assert len(message) < 500
    ((_, message),) = problems(max_out_tokens=10 ** 100_000)
    assert len(message) < 500 and "digits" in message


def test_nul_bytes_in_paths_and_keys(tmp_path):
    ((path, message),) = problems("conf\0ig.json")
    assert path == "config" and "NUL byte" in message
    assert problems({"tensor_paralel\0": {}})[0][0] == "tensor_paralel\0"
    assert "NUL byte" in problems(base_dir="a\0b")[0][1]
    assert "NUL byte" in problems(checkpoint="ckpt\0.json")[0][1]
    (tmp_path / "c.json").write_text('{"zero\\u0000": 1}')
    assert problems(tmp_path / "c.json")[0][0] == "zero\0"


# -- bounded cost -----------------------------------------------------------------------------------------

def _timed_problems(*args, **kwargs) -> list:
    start = time.perf_counter()
    found = problems(*args, **kwargs)
    assert time.perf_counter() - start < TIME_LIMIT_S
    return found


def test_billion_laughs_yaml_is_rejected_quickly(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ", ".join(f"*{prev}" for _ in range(9)) + "]")
    text = "zero:\n" + "\n".join("  " + line for line in lines) + "\n"
    assert len(text.encode()) < 600
    (tmp_path / "lol.yaml").write_text(text)
    ((path, message),) = _timed_problems(tmp_path / "lol.yaml")
    assert f"more than {MAX_NODES:,} values" in message


def test_yaml_merge_key_bomb_is_bounded(tmp_path):
    lines = ["a0: &a0 {k: 1}"] + [f"a{i + 1}: &a{i + 1} {{<<: [*a{i}, *a{i}], k{i}: 1}}" for i in range(40)]
    (tmp_path / "merge.yaml").write_text("zero:\n" + "\n".join("  " + line for line in lines) + "\n")
    start = time.perf_counter()
    try:
        load_config(tmp_path / "merge.yaml")
    except ConfigError:
        pass
    assert time.perf_counter() - start < TIME_LIMIT_S


def test_many_unknown_keys_are_reported_quickly(tmp_path):
    (tmp_path / "u.json").write_text(json.dumps({f"key{i}": i for i in range(40_000)}))
    found = _timed_problems(tmp_path / "u.json")
    assert len(found) == 40_000 and found[0] == ("key0", "unknown key `key0`")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "u.json")
    assert len(str(e.value).splitlines()) == 201 and "39800 more problems" in str(e.value)


def test_large_and_deep_files_are_rejected_quickly(tmp_path):
    big = tmp_path / "big.json"
    big.write_text('{"zero": {"x": "' + "a" * MAX_FILE_BYTES + '"}}')
    assert "larger than" in _timed_problems(big)[0][1]
    wide = tmp_path / "wide.json"
    wide.write_text('{"zero": {"x": [' + "1," * 1_500_000 + "1]}}")
    assert "values" in _timed_problems(wide)[0][1]
    for name, text in (("deep.json", "[" * 100_000 + "]" * 100_000),
                       ("deep.yaml", "[" * 100_000 + "]" * 100_000),
                       ("deep2.json", '{"zero": ' + '{"a": ' * 500 + "1" + "}" * 501),
                       ("deep2.yaml", "zero: " + "[" * 500 + "]" * 500)):
        (tmp_path / name).write_text(text)
        assert _timed_problems(tmp_path / name)


def test_config_check_on_deep_input_exits_1(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text('{"zero": ' + '{"a": ' * 5000 + "1" + "}" * 5001)
    assert main(["config", "check", str(path)]) == 1
    assert "nested" in capsys.readouterr().err


# -- duplicate keys -------------------------------------------------------------------------------------

def test_duplicate_keys_in_json_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"tp": {"tp_size": 2, "tp_size": 2}, "zero": {"a": [{"k": 1, "k": 2}]}, "dtype": "bf16"}')
    found = problems(path)
    assert [p for p, _ in found] == ["tp.tp_size", "zero.a[0].k"]
    assert all("given twice" in m and "d.json" in m for _, m in found)


def test_duplicate_keys_in_yaml_name_the_lines(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("tp:\n  tp_size: 2\n  tp_size: 4\nzero: {a: 1, a: 1}\n")
    found = problems(path)
    assert found[0] == ("tp.tp_size", f"is given twice in config file {str(path)!r} (lines 2 and 3); give each key once")
    assert found[1][0] == "zero.a" and "(line 4)" in found[1][1]


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {tp_size: 2, tp_grain_size: 32}\n")
    data = read_config_file(path)
    path.write_text("zero: &z {stage: 3, offload: false}\ntp: {tp_size: 2}\nquant:\n  weight: &w {num_bits: 4}\n"
                    "checkpoint: {<<: *z, stage: 2}\n")
    data = read_config_file(path)
    assert data["checkpoint"] == {"stage": 2, "offload": False}


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"zero: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "not valid YAML" in problems(path)[0][1]
    assert not marker.exists()
