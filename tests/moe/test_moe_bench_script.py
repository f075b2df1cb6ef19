"""``benchmarks/moe_decode.py`` runs end to end on a CPU with the tiny preset and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_decode.py"


def _load():
    spec = importlib.util.spec_from_file_location("moe_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_runs_and_records(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "moe.json"
    assert bench.main(["--preset", "tiny", "--batch", "2", "--prompt", "8", "--new-tokens", "3", "--hf-tokens", "2",
                       "--repeats", "1", "--variants", "bf16", "int8", "--json", str(out),
                       "--log", str(tmp_path / "moe.log")]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("bf16", 2), ("int8", 2)]
    for r in rows:
        assert r["decoder"] == "engine" and r["hf_eager_ms_per_token"] is not None
        assert r["distinct_measured"] is not None and 1 <= r["distinct_measured"] <= 4
        assert r["bytes"]["routed_experts"] > 0 and r["bytes"]["total"] > r["bytes"]["routed_experts"]
    assert rows[1]["bytes"]["routed_experts"] < rows[0]["bytes"]["routed_experts"]  # int8 reads fewer bytes
    assert bench.expected_distinct(8, 2, 1) == 2.0
