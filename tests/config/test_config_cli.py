"""``policyinject config check / schema / table`` through the CLI entry point and a real process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policyinject.cli import main
from policyinject.config import load_config
from policyinject.config.doc_table import render_key_table
from policyinject.config.keys import KEYS, Status

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "ds_inference_config.json"


def test_check_example_prints_normalized_json_and_warnings(capsys):
    assert main(["config", "check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["tensor_parallel"]["tp_size"] == 2 and "mp_size" not in printed
    assert load_config(printed) == load_config(printed)  # loads back
    assert "warning: DeprecationWarning: `mp_size` is deprecated" in err
    assert "`replace_method` is deprecated" in err


def test_check_yaml_with_user_warning(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("use_triton: true\ntp:\n  tp_size: 2\n")
    assert main(["config", "check", str(tmp_path / "c.yaml")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["use_triton"] is True
    assert "warning: UserWarning: `use_triton` = True is ignored here" in err


def test_check_bad_config_exits_1_with_every_problem(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"tp": {"tp_size": 0}, "tensor_paralel": {}, "dtype": "fp8", "mp_size": 2,
                                "tensor_parallel": {"tp_size": 2}}))
    assert main(["config", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "invalid config (5 problems)" in err
    for needle in ["tp.tp_size: must be >= 1, got 0", "did you mean `tensor_parallel`?", "dtype: unknown dtype",
                   "mp_size: cannot give the deprecated", "`tp` and `tensor_parallel` are the same key"]:
        assert needle in err


def test_check_missing_file(capsys):
    assert main(["config", "check", "/no/such/file.yaml"]) == 1
    assert "not found" in capsys.readouterr().err


def test_schema(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    props = schema["properties"]
    assert props["mp_size"]["deprecated"] is True and "tensor_parallel.tp_size" in props["mp_size"]["description"]
    assert props["kernel_inject"]["description"].startswith("Alias of `replace_with_kernel_inject`")
    assert schema["additionalProperties"] is False
    tp = schema["$defs"]["TensorParallelConfig"]["properties"]
    assert tp["tp_size"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert {"$ref": "#/$defs/MoEConfig"} in props["moe"]["anyOf"] and {"type": "boolean"} in props["moe"]["anyOf"]
    assert "num_experts" in schema["$defs"]["MoEConfig"]["properties"]


def test_schema_covers_every_key(capsys):
    main(["config", "schema"])
    schema = json.loads(capsys.readouterr().out)
    defs = {"": schema, **{s.path: schema["$defs"][s.cls] for s in KEYS if s.status is Status.SECTION}}
    for spec in KEYS:
        props = defs[spec.parent]["properties"]
        for name in (spec.name, *spec.aliases):
            assert name in props, spec.path


def test_schema_accepts_to_dict_output_if_jsonschema_is_installed(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    main(["config", "schema"])
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator(schema).validate(load_config().to_dict())
    jsonschema.Draft202012Validator(schema).validate(json.loads(EXAMPLE.read_text()))


def test_table(capsys):
    assert main(["config", "table"]) == 0
    assert capsys.readouterr().out.strip() == render_key_table()


def test_config_without_subcommand_prints_help(capsys):
    assert main(["config"]) == 2
    assert "check" in capsys.readouterr().out


def test_check_in_a_real_process():
    script = shutil.which("policyinject", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-c", "import sys; from policyinject.cli import main; "
                                                            "sys.exit(main())"]
    proc = subprocess.run([*command, "config", "check", str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["replace_with_kernel_inject"] is True
    assert "DeprecationWarning: `mp_size` is deprecated" in proc.stderr
