"""Hugging Face tensor-parallel plan styles: the one list of names ``tensor_parallel.tp_plan`` accepts.

A plan maps module-path globs (``"layers.*.self_attn.q_proj"``) to a style name, as in a transformers
model config's ``base_model_tp_plan``. Other modules (the policy short-form converter) should import
:data:`HF_TP_STYLES` from here rather than keep their own copy.

Example:
    >>> check_tp_plan({"layers.*.self_attn.o_proj": "rowwise"})
    {'layers.*.self_attn.o_proj': 'rowwise'}
    >>> check_tp_plan("auto")
    'auto'
"""

from __future__ import annotations

import difflib
from typing import Any, Optional, Union

from .errors import InvalidValue, short_repr

#: Style names of the Hugging Face TP plan form (transformers' ``ALL_PARALLEL_STYLES`` and older names).
HF_TP_STYLES = (
    "colwise", "rowwise", "colwise_rep", "rowwise_rep", "colwise_gather_output", "rowwise_split_input",
    "packed_colwise", "packed_rowwise", "embedding_rowwise", "embedding_colwise", "replicate",
    "local_colwise", "local_rowwise", "local_packed_rowwise", "local", "gather", "sequence_parallel",
    "replicated_with_grad_allreduce", "vocab", "isolated", "all_reduce", "local_params", "mla_kv_a_proj",
    "moe_tp_experts", "moe_identity_expert", "grouped_gemm", "ep_dispatch_experts", "ep_router",
    "ep_router_experts",
)


def check_tp_plan(value: Any) -> Optional[Union[str, dict]]:
    """Validate a ``tp_plan`` value: None, ``"auto"`` (the model's own plan) or ``{glob: style}``.

    Every bad entry is reported (``InvalidValue`` with one ``("['glob']", message)`` pair per entry).

    Example:
        >>> try:
        ...     check_tp_plan({"lm_head": "colwize"})
        ... except ValueError as e:
        ...     print(e.problems)
        [("['lm_head']", 'unknown tensor-parallel style `colwize`; did you mean `colwise`?')]
    """
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise InvalidValue(f"expected None, \"auto\" or a mapping {{module glob: style}}, got {short_repr(value)}")
    if not hasattr(value, "items") or not callable(value.items):
        raise InvalidValue(f"expected None, \"auto\" or a mapping {{module glob: style}}, got {short_repr(value)}")
    problems = []
    out = {}
    for glob, style in list(value.items()):
        where = f"[{glob!r}]"
        if not isinstance(glob, str) or not glob:
            problems.append((where, f"a plan key must be a non-empty module-path glob, got {short_repr(glob)}"))
            continue
        if not isinstance(style, str):
            problems.append((where, f"expected a style name, got {short_repr(style)}"))
            continue
        if style not in HF_TP_STYLES:
            close = difflib.get_close_matches(style, HF_TP_STYLES, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f" (known styles: {', '.join(HF_TP_STYLES)})"
            problems.append((where, f"unknown tensor-parallel style `{style}`{hint}"))
            continue
        out[glob] = style
    if problems:
        raise InvalidValue(problems=problems)
    return out
