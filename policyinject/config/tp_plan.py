"""Hugging Face tensor-parallel plan styles: the one list of names ``tensor_parallel.tp_plan`` accepts.

A plan maps module-path globs (``"layers.*.self_attn.q_proj"``) to a style name, as in a transformers
model config's ``base_model_tp_plan``. :data:`HF_TP_STYLES` is the one table of style names: what this
validation accepts is exactly what the planner converts.

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

#: What an expert-parallel / mixture-of-experts style converts to: nothing (dropped with a lint message, the
#: experts stay replicated).
MOE = "moe"

#: The one table of Hugging Face TP plan style names (transformers' ``ALL_PARALLEL_STYLES`` and older names)
#: policyinject accepts: name -> the ``policyinject.policy.Style`` value the planner uses, or :data:`MOE`.
#: ``tensor_parallel.tp_plan`` validation and the planner's converter
#: (:func:`policyinject.policy.shortforms.hf_style`) both read it.
HF_STYLE_TABLE = {
    "colwise": "column", "local_colwise": "column",
    "rowwise": "row", "local_rowwise": "row",
    "colwise_rep": "column_gather", "colwise_gather_output": "column_gather",
    "rowwise_rep": "row_split_input", "rowwise_split_input": "row_split_input",
    "packed_colwise": "packed_column",
    "embedding_rowwise": "vocab_embedding",
    "replicate": "replicate", "replicated_with_grad_allreduce": "replicate", "sequence_parallel": "replicate",
    "gather": "replicate", "local": "replicate",
    "moe_tp_experts": MOE, "grouped_gemm": MOE, "ep_router": MOE, "local_packed_rowwise": MOE,
    "packed_rowwise": MOE, "isolated": MOE, "moe_identity_expert": MOE, "ep_dispatch_experts": MOE,
    "ep_router_experts": MOE,
}
#: The accepted style names, in table order.
HF_TP_STYLES = tuple(HF_STYLE_TABLE)

#: Style names transformers knows that policyinject cannot plan, with the reason: rejected at validation.
HF_UNSUPPORTED_STYLES = {
    "embedding_colwise": "an embedding split by hidden columns is not implemented; use 'embedding_rowwise'",
    "vocab": "not implemented; use 'embedding_rowwise' for the embedding and 'colwise_rep' for the head",
    "all_reduce": "a bare all-reduce hook is not implemented",
    "local_params": "parameter-level plans are not implemented",
    "mla_kv_a_proj": "multi-head latent attention is not implemented",
}


def unsupported_style_message(style: str) -> str:
    """Why ``style`` (a known or unknown name not in :data:`HF_TP_STYLES`) is refused.

    Example:
        >>> unsupported_style_message("colwize")
        'unknown tensor-parallel style `colwize`; did you mean `colwise`?'
    """
    if style in HF_UNSUPPORTED_STYLES:
        return f"tensor-parallel style `{style}` is not supported by policyinject: {HF_UNSUPPORTED_STYLES[style]}"
    close = difflib.get_close_matches(style, list(HF_TP_STYLES), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else f" (known styles: {', '.join(HF_TP_STYLES)})"
    return f"unknown tensor-parallel style `{style}`{hint}"

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
            problems.append((where, unsupported_style_message(style)))
            continue
        out[glob] = style
    if problems:
        raise InvalidValue(problems=problems)
    return out
