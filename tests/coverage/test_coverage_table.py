"""The coverage table of docs/builtin-policies.md is generated from every installed causal-LM architecture.

Each architecture's tiny random model is built and checked (kernel injection planned, TP at ``tp_size=2`` with
AutoTP verification, int8 through ``init_inference``); the rendered table, with its summary counts, must equal
the committed one. Regenerate with ``POLICYINJECT_REGEN_COVERAGE=1 python -m pytest tests/coverage``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyinject.testing.coverage import (BEGIN, END, architectures, coverage_rows, render_table, replace_section,
                                           summarize)

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "builtin-policies.md"


def test_coverage_table_is_up_to_date():
    import transformers

    rows = coverage_rows()
    assert len(rows) == len(architectures()) > 100
    by = {r.model_type: r for r in rows}
    # the families with a policy keep it; the verified plans of these families are exercised on gloo elsewhere
    assert by["llama"].injection.startswith("policy (") and by["llama"].tp == "policy"
    for moe in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):  # whole MoE blocks are injected
        assert by[moe].injection == "policy (2/2 layers)", by[moe]
    summary = summarize(rows)
    # weight-only int8 applies to every linear of any model that builds
    assert summary.quant_works == summary.runs, [r for r in rows if not r.quant.startswith(("works", "tiny"))]
    section = render_table(rows, transformers.__version__)
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} has no generated coverage section"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    if os.environ.get("POLICYINJECT_REGEN_COVERAGE") == "1":
        DOC.write_text(replace_section(text, section))
        return
    assert current == section, (f"{DOC.name}: the coverage table is out of date (transformers "
                                f"{transformers.__version__}); regenerate it with POLICYINJECT_REGEN_COVERAGE=1")
