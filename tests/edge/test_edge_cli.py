"""``policyinject inspect`` on bad input: a clear message and exit status 1 (argparse errors: 2), never a
traceback; ``--set`` overrides ``--config`` whatever spelling (alias, deprecated key) either uses."""

from __future__ import annotations

import json

import pytest

from policyinject.cli import main


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, expected", [
    (["inspect", "tiny:llama", "--set", 'injection_policy={"nosuch.mod.Block": "x"}'], "names no class"),
    (["inspect", "tiny:llama", "--set",
      'injection_policy={"transformers.models.llama.modeling_llama.LlamaDecoderLayer": "mlp.nope"}'],
     "names no submodule"),
    (["inspect", "tiny:llama", "--set", "enable_cuda_graph=true"], "enable_cuda_graph"),
])
def test_policy_and_unsupported_errors_are_reported_not_raised(capsys, argv, expected):
    code, _, err = _run(capsys, argv)
    assert code == 1
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["inspect", "tiny:nosuch"], "nosuch"),
    (["inspect", "json:loads"], "json:loads"),
    (["inspect", "os:getcwd"], "not a torch.nn.Module"),
])
def test_bad_model_specs_are_reported(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    assert expected in str(info.value.code)


def test_a_folder_without_a_model_config_is_reported(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(tmp_path)])
    assert str(tmp_path) in str(info.value.code)


def test_conflicting_set_assignments_are_reported(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "tiny:llama", "--set", "tp=2", "--set", "tp.tp_size=2"])
    assert "tp" in str(info.value.code) and "--set" in str(info.value.code)


@pytest.mark.parametrize("assignment, key, value", [
    ("tp.tp_size=2", ("tensor_parallel", "tp_size"), 2),
    ("kernel_inject=false", ("replace_with_kernel_inject",), False),
    ("mp_size=2", ("tensor_parallel", "tp_size"), 2),
    ("dtype=fp32", ("dtype",), "fp32"),
])
def test_set_overrides_the_config_file_in_any_spelling(capsys, tmp_path, assignment, key, value):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"kernel_inject": True, "dtype": "bf16", "tp": {"tp_grain_size": 32}}))
    code, out, err = _run(capsys, ["inspect", "tiny:llama", "--config", str(path), "--set", assignment, "--json"])
    assert code == 0, err
    plan = json.loads(out)
    assert plan is not None
    from policyinject.cli.inspect_cmd import load_inspect_config

    cfg = load_inspect_config(str(path), [assignment])
    node = cfg
    for part in key:
        node = getattr(node, part)
    assert node == value
    assert cfg.tensor_parallel.tp_grain_size == 32  # the file's other keys are kept
