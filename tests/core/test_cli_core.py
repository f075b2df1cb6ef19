"""The plugins and inspect commands through their entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from policyinject.cli import main


def test_plugins_table_and_json(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "policyinject-example-plugin" in out
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(p["name"] == "toy" and "layer ToyBlock" in p["registers"] for p in data)


def test_inspect_preset_allocates_nothing_and_prints_the_plan(capsys):
    assert main(["inspect", "llama-3-8b", "--set", "dtype=\"bf16\"", "--max-rows", "5"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "layers matched: 32" in out


def test_inspect_json(capsys):
    assert main(["inspect", "tiny:gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["actions"][0]["pass"] == "dtype"


def test_inspect_bad_config_is_a_clear_error(capsys):
    assert main(["inspect", "tiny:llama", "--set", "tensor_paralel.tp_size=2"]) == 1
    assert "tensor_parallel" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "policyinject.cli", "plugins", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)


def test_inspect_a_custom_model_through_its_plugin_and_the_deepspeed_tuple(capsys):
    spec = "policyinject_example_plugin.modeling:build_toy"
    assert main(["inspect", spec, "--set", "tensor_parallel.tp_size=2"]) == 0
    out = capsys.readouterr().out
    assert "model policy: ToyForCausalLM (plugin policyinject-example-plugin:toy)" in out
    assert "blocks.0.attn.out_proj" in out and " row " in out and " column " in out
    ds = '{"policyinject_example_plugin.modeling.ToyBlock": ["attn.out_proj", "mlp.fc2"]}'
    assert main(["inspect", spec, "--set", "tensor_parallel.tp_size=2", "--set", f"injection_policy={ds}",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    styles = {a["module"]: a["action"] for a in data["actions"] if a["pass"] == "tensor_parallel"}
    assert styles["blocks.0.mlp.fc2"] == "row" and styles["blocks.0.mlp.fc1"] == "column"


def test_inspect_shows_the_quantized_weight_bytes(capsys):
    assert main(["inspect", "llama-3-8b", "--set", "dtype=\"int8\"", "--max-rows", "1"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("weight bytes (planned)"))
    ratio = float(line.split("GiB (")[1].split("x;")[0])
    assert 0.5 < ratio < 0.6, line  # whole model: embeddings and the head stay 16-bit
    assert "linears 0.50x at 8 bits" in line, line
