"""The coverage table: what policyinject does for every causal-LM architecture of the installed transformers.

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built from the default config
with small sizes (:func:`tiny_causal_lm`), and three things are recorded (:func:`coverage_row`): kernel
injection (a plugin policy matches its layers, or none), tensor parallelism at ``tp_size=2`` (planned only,
no process group: a policy, the model's own Hugging Face plan or AutoTP heuristics -- both verified on one
process --, or refused with the reason), and weight-only int8 quantization through the public API
(``init_inference(model, dtype="int8")``: how many linears were quantized, or why it failed).
:func:`render_table` writes the Markdown section kept in ``docs/builtin-policies.md``.

Example:
    >>> row = coverage_row("llama")
    >>> row.injection, row.tp, row.quant.startswith("works")
    ('policy (2/2 layers)', 'policy', True)
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import attrs
import torch

__all__ = ["TINY_SIZES", "CoverageRow", "tiny_causal_lm", "coverage_row", "coverage_rows", "summarize",
           "render_table", "architectures"]

#: Sizes set on a default config where the config has the attribute (through its ``attribute_map`` aliases).
TINY_SIZES: Dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=128, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, ffn_dim=128, n_inner=128, d_ff=128, decoder_ffn_dim=128,
    encoder_ffn_dim=128, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
    word_embed_proj_dim=64, first_k_dense_replace=1, global_head_dim=16, num_global_key_value_heads=2,
    rotary_dim=8, partial_rotary_factor=0.5, bos_token_id=0, eos_token_id=1, pad_token_id=2, decoder_start_token_id=0,
    sliding_window=16, attention_chunk_size=16, ffn_hidden_size=128, n_positions=128, intermediate_dim=128,
    moe_ffn_hidden_size=32,
    # linear-attention and state-space mixers (their default widths dominate the run time otherwise)
    linear_key_head_dim=16, linear_value_head_dim=16, linear_head_dim=16, linear_num_heads=4,
    linear_num_key_heads=2, linear_num_value_heads=4, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
    mamba_d_state=16, mamba_chunk_size=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
    mamba_headdim=16, attention_hidden_size=64, n_group=1, topk_group=1, index_n_heads=4, index_head_dim=16,
    # hybrids: one attention layer among the two (Jamba: layer 1)
    attn_layer_period=2, attn_layer_offset=1,
    # per-layer input embeddings (Gemma-3n / Gemma-4); 0 (switched off) stays 0, see _OFF_WHEN_ZERO
    vocab_size_per_layer_input=256, hidden_size_per_layer_input=16,
)

#: Sizes whose 0 switches a feature off: a 0 is kept.
_OFF_WHEN_ZERO = frozenset({"hidden_size_per_layer_input"})


#: A "tiny" model larger than this is not built (its config has sizes :data:`TINY_SIZES` does not reach).
MAX_PARAMS = 4_000_000


def architectures() -> List[str]:
    """Every ``model_type`` with a causal-LM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(cfg: Any) -> None:
    # a heterogeneous config (per-layer attributes) refuses global reads of per-layer sizes unless asked
    if getattr(cfg, "is_heterogeneous", False):
        cfg.allow_global_per_layer_attribute_access = True
    mla_rope_is_head_dim = getattr(cfg, "qk_rope_head_dim", None) is not None and \
        getattr(cfg, "head_dim", None) == cfg.qk_rope_head_dim
    for key, value in TINY_SIZES.items():
        if hasattr(cfg, key) and getattr(cfg, key) is not None and not isinstance(getattr(cfg, key), bool) \
                and not (key in _OFF_WHEN_ZERO and getattr(cfg, key) == 0):
            try:
                setattr(cfg, key, value)
            except Exception:  # noqa: BLE001 - a read-only alias
                pass
    # sizes the config derives from others when it is built (multi-head latent attention, hybrid layouts)
    if getattr(cfg, "qk_rope_head_dim", None) is not None and getattr(cfg, "qk_nope_head_dim", None) is not None:
        if getattr(cfg, "qk_head_dim", None) is not None:
            cfg.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if mla_rope_is_head_dim:
            cfg.head_dim = cfg.qk_rope_head_dim
    if hasattr(cfg, "attn_layer_indices"):
        cfg.attn_layer_indices = [1]
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) != 2:
        distinct = list(dict.fromkeys(types))
        cfg.layer_types = (distinct + distinct)[:2]
    from transformers import PretrainedConfig

    for sub, inner in list(vars(cfg).items()):
        if isinstance(inner, PretrainedConfig) and inner is not cfg:
            _shrink(inner)


def tiny_causal_lm(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random fp32 causal LM of ``model_type`` (default config with :data:`TINY_SIZES`).

    Example:
        >>> type(tiny_causal_lm("gpt2")).__name__
        'GPT2LMHeadModel'
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type)
    _shrink(cfg)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"the tiny config of {model_type} still has {n / 1e6:.0f}M parameters")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


@attrs.frozen
class CoverageRow:
    """One architecture's line of the table."""

    model_type: str
    model_class: str
    injection: str
    tp: str
    quant: str


_NUMBER = re.compile(r"\d+\.\d+(e[-+]?\d+)?|0x[0-9a-f]+")


def _why(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln[2:] for ln in lines if ln.startswith("- ")), lines[0] if lines else type(exc).__name__)
    if text.endswith(":") and len(lines) > 1 and text == lines[0]:
        text = f"{text} {lines[1]}"  # "validation error for ...:" then the reason on the next line
    text = _NUMBER.sub("#", text).replace("|", "/")
    return text[:110] + ("..." if len(text) > 110 else "")


def coverage_row(model_type: str, plugins: Optional[Any] = None) -> CoverageRow:
    """Build the tiny model of ``model_type`` and record injection, TP and int8 quantization (see the module).

    ``plugins``: the :class:`~policyinject.PluginManager` to resolve policies with (default: a fresh
    :meth:`~policyinject.PluginManager.default`; pass one to share its entry-point discovery between rows).
    """
    from .. import init_inference, plan_inference
    from .._plugin_manager import PluginManager
    from ..config import load_config
    from ..passes.quantize import EXPERTS_STAY_FLOAT
    from ..policy.resolve import resolve_policies

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?")
    try:
        model = tiny_causal_lm(model_type)
    except Exception as exc:  # noqa: BLE001
        what = "too large" if "still has" in str(exc) else f"{type(exc).__name__}: {_why(exc)}"
        return CoverageRow(model_type, cls_name, "-", "-", f"tiny model does not build: {what}")
    try:
        with torch.no_grad():
            model(torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(0)))
    except Exception as exc:  # noqa: BLE001
        return CoverageRow(model_type, type(model).__name__, "-", "-",
                           f"tiny model does not run: {type(exc).__name__}: {_why(exc)}")
    cls_name = type(model).__name__
    plugins = plugins if plugins is not None else PluginManager.default()
    try:
        resolved = resolve_policies(model, load_config(None), plugins)
        injection = _injection(model, plugins) if any(m.resolved_by.value == "plugin" for m in resolved.layers) \
            else "none"
    except Exception as exc:  # noqa: BLE001
        injection = f"refused: {_why(exc)}"
    try:
        plan = plan_inference(model, dtype="fp32", tensor_parallel={"tp_size": 2, "tp_grain_size": 8},
                              plugins=plugins)
        by = sorted({m.resolved_by.value for m in plan.layers})
        names = {"plugin": "policy", "autotp:hf_plan": "HF plan (verified)",
                 "autotp:heuristic": "verified heuristic"}
        tp = ", ".join(names.get(b, b) for b in by) or "nothing to split"
    except Exception as exc:  # noqa: BLE001
        tp = f"refused: {_why(exc)}"
    try:
        engine = init_inference(model, dtype="int8", plugins=plugins)
        n = sum(1 for a in engine.plan.for_pass("quantize") if a.action == "quantize")
        experts = any(line.startswith(EXPERTS_STAY_FLOAT) for line in engine.plan.lint)
        quant = (f"works ({n} linears{'; ' + _EXPERTS_FLOAT if experts else ''})" if n
                 else "runs, quantizes nothing")
    except Exception as exc:  # noqa: BLE001
        quant = f"fails: {type(exc).__name__}: {_why(exc)}"
    return CoverageRow(model_type, cls_name, injection, tp, quant)


def _injection(model: torch.nn.Module, plugins: Any) -> str:
    """``policy (k/n layers)``: of the n layers a plugin policy matches, k are replaced by the kernel plan."""
    from .. import plan_inference

    try:
        plan = plan_inference(model, dtype="fp32", replace_with_kernel_inject=True, plugins=plugins)
    except Exception as exc:  # noqa: BLE001
        return f"policy, refused: {_why(exc)}"
    paths = {layer.path for layer in plan.layers}
    done = {a.path for a in plan.actions
            if a.pass_name == "kernel_inject" and a.path in paths and a.action in ("replace", "replace_submodules")}
    if not done:
        reasons = sorted({str(a.details.get("reason", a.action)) for a in plan.actions
                          if a.pass_name == "kernel_inject" and a.path in paths}) or ["no action planned"]
        return f"policy, nothing injected: {_why(ValueError('; '.join(reasons)))}"
    return f"policy ({len(done)}/{len(paths)} layers)"


def coverage_rows(model_types: Optional[List[str]] = None) -> List[CoverageRow]:
    """:func:`coverage_row` of each of ``model_types`` (default: :func:`architectures`), quietly and quickly.

    One plugin manager serves every row (entry points are discovered once); transformers' logging and
    Python warnings are silenced and torch runs on one thread while the rows are built (the tiny shapes
    gain nothing from more), all restored afterwards.

    Example:
        >>> [r.injection for r in coverage_rows(["gpt2"])]
        ['policy (2/2 layers)']
    """
    import logging
    import warnings

    import transformers

    from .._plugin_manager import PluginManager

    plugins = PluginManager.default()
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [coverage_row(a, plugins) for a in (architectures() if model_types is None else model_types)]
    finally:
        torch.set_num_threads(threads)
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(verbosity)


BEGIN = "<!-- coverage table: generated by tests/coverage/test_coverage_table.py; do not edit -->"
END = "<!-- end of coverage table -->"


_EXPERTS_FLOAT = "routed experts (3-D weights) stay float"

#: The tensor-parallel sources of the table, as its ``tensor parallel`` column spells them.
TP_SOURCES = ("policy", "HF plan (verified)", "verified heuristic", "nothing to split")


@attrs.frozen
class Summary:
    """The counts stated above the table (each derived from the rows, see :func:`summarize`)."""

    architectures: int
    #: Tiny model built and ran one forward.
    runs: int
    #: A plugin policy matches the layers and the kernel plan replaces at least one.
    injected: int
    #: Distinct model classes among :attr:`injected` (aliases of one model_type share a class).
    injected_classes: int
    #: ``tensor parallel`` source -> architectures planned by it (a model may count under two sources).
    tp: Dict[str, int]
    tp_refused: int
    quant_works: int
    #: Of :attr:`quant_works`: the routed experts (3-D parameters, not ``nn.Linear``) stay in floating point.
    quant_experts_float: int


def summarize(rows: List[CoverageRow]) -> Summary:
    """The counts of ``rows``.

    Example:
        >>> s = summarize([CoverageRow("llama", "L", "policy (2/2 layers)", "policy", "works (7 linears)"),
        ...                CoverageRow("x", "X", "-", "-", "tiny model does not build: TypeError")])
        >>> s.runs, s.injected, s.tp["policy"], s.quant_works
        (1, 1, 1, 1)
    """
    runs = [r for r in rows if not r.quant.startswith("tiny model does not")]
    tp = {src: sum(1 for r in runs if src in r.tp.split(", ")) for src in TP_SOURCES}
    injected = [r for r in runs if r.injection.startswith("policy (")]
    return Summary(len(rows), len(runs), len(injected), len({r.model_class for r in injected}),
                   tp, sum(1 for r in runs if r.tp.startswith("refused")),
                   sum(1 for r in runs if r.quant.startswith("works")),
                   sum(1 for r in runs if r.quant.startswith("works") and _EXPERTS_FLOAT in r.quant))


def render_table(rows: List[CoverageRow], transformers_version: str) -> str:
    """The generated Markdown section (between :data:`BEGIN` and :data:`END`).

    Example:
        >>> row = CoverageRow("llama", "LlamaForCausalLM", "policy (2/2 layers)", "policy", "works (7 linears)")
        >>> text = render_table([row], "5.24.0")
        >>> text.splitlines()[-3], "transformers 5.24.0" in text
        ('| `llama` | `LlamaForCausalLM` | policy (2/2 layers) | policy | works (7 linears) |', True)
    """
    lines = [BEGIN, "",
             f"Produced with transformers {transformers_version}, torch {torch.__version__.split('+')[0]}: tiny "
             f"random models (hidden 64, 2 layers, fp32, CPU); TP planned at `tp_size=2`, `tp_grain_size=8` "
             f"(plans not from a policy are verified on one process); int8 through `init_inference(model, "
             f"dtype=\"int8\")`.", "", _summary_text(summarize(rows)), "",
             "| model_type | class | kernel injection | tensor parallel | int8 quantization |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r.model_type}` | `{r.model_class}` | {r.injection} | {r.tp} | {r.quant} |")
    lines += ["", END]
    return "\n".join(lines)


def _summary_text(s: Summary) -> str:
    tp = ", ".join(f"{s.tp[src]} {src}" for src in TP_SOURCES)
    return (f"**Summary:** {s.architectures} architectures; the tiny model builds and runs for {s.runs}. "
            f"Kernel injection: {s.injected} ({s.injected_classes} distinct model classes). Tensor parallel: {tp} (a model may count under two sources); "
            f"{s.tp_refused} refused at plan time. int8 quantization works: {s.quant_works} of {s.runs} (in "
            f"{s.quant_experts_float} of them the routed experts, 3-D parameters rather than `nn.Linear`, stay in "
            f"floating point unless a policy's MoE block is injected).")


def replace_section(text: str, section: str) -> Optional[str]:
    """``text`` with its generated section replaced by ``section`` (None when the markers are missing)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        return None
    return text[:start] + section + text[end + len(END):]
