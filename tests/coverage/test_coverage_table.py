"""The coverage table of docs/builtin-policies.md is generated from every installed causal-LM architecture.

Each architecture's tiny random model is built and checked (kernel injection, TP at ``tp_size=2`` with AutoTP
verification, int8 through ``init_inference``); the rendered table must equal the committed one. Regenerate
with ``POLICYINJECT_REGEN_COVERAGE=1 python -m pytest tests/coverage/test_coverage_table.py``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

from policyinject.testing.coverage import BEGIN, END, architectures, coverage_row, render_table, replace_section

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "builtin-policies.md"


def test_coverage_table_is_up_to_date():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = [coverage_row(a) for a in architectures()]
    finally:
        logging.disable(logging.NOTSET)
    assert len(rows) == len(architectures()) > 100
    by = {r.model_type: r for r in rows}
    # the families with a policy keep it; the verified plans of these families are exercised on gloo elsewhere
    assert by["llama"].injection == "policy" and by["llama"].tp == "policy"
    section = render_table(rows, transformers.__version__)
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} has no generated coverage section"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    if os.environ.get("POLICYINJECT_REGEN_COVERAGE") == "1":
        DOC.write_text(replace_section(text, section))
        return
    assert current == section, (f"{DOC.name}: the coverage table is out of date (transformers "
                                f"{transformers.__version__}); regenerate it with POLICYINJECT_REGEN_COVERAGE=1")
