"""The model-level step of the decode engine, built from the :class:`~policyinject.policy.ModelPolicy`.

``embed (+ position embed) -> for each layer block.run(h, cos, sin, attend) -> final norm -> lm_head``
(pre-norm blocks through ``run_deferred``: each block's last residual add is fused into the next norm), with
the head applied to the last position only when asked (decode steps and the end of a prefill). Rotary
tables are computed once, for every position the cache can hold, by the model's own rotary module
(``ModelPolicy.rotary_emb``) and indexed per token, so a decode step has static shapes and no trigonometry.

Every layer must be an injected block (a module with ``run(hidden, cos, sin, attend)``); :func:`decode_problems`
lists what a model lacks, naming the layer class and the policy field, and :class:`DecodeRunner` raises
:class:`~policyinject.errors.UnsupportedError` with that list.

Example:
    >>> import torch
    >>> from policyinject.testing.presets import tiny_model
    >>> from policyinject_plugins.llama import LLAMA_CAUSAL_LM
    >>> decode_problems(tiny_model("llama"), LLAMA_CAUSAL_LM)[0]
    'model.layers.0: LlamaDecoderLayer is not an injected block (no run(hidden, cos, sin, attend)); the decode engine needs replace_with_kernel_inject=True and a layer policy with a block wiring (pre_norm, parallel or post_norm; `opaque` keeps the layer)'
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from ..policy.model import read_value

__all__ = ["DecodeRunner", "decode_problems", "layer_windows", "unrun_parts"]

#: Model-level config keys whose non-neutral value changes the model's forward outside the layers, with the
#: neutral values and the ModelPolicy field that must declare it for the decode engine to run it.
_MODEL_LEVEL_KEYS = (
    ("embedding_multiplier", (None, 1, 1.0), "embed_scale"),
    ("logits_scaling", (None, 1, 1.0), "logit_scale"),
    ("logit_scale", (None, 1, 1.0), "logit_scale"),
    ("final_logit_softcapping", (None, 0, 0.0), "final_logit_softcap"),
)


def _get(model: torch.nn.Module, path: Optional[str]) -> Optional[torch.nn.Module]:
    if path is None:
        return None
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def layer_windows(model_config: Any, num_layers: int) -> List[Optional[int]]:
    """Sliding-window size of each layer (None = full attention), from ``layer_types``/``sliding_window``.

    Example:
        >>> class C: sliding_window = 8; layer_types = ["sliding_attention", "full_attention"]
        >>> layer_windows(C(), 2)
        [8, None]
    """
    window = getattr(model_config, "sliding_window", None)
    if not window:
        return [None] * num_layers
    types = getattr(model_config, "layer_types", None)
    if types:
        return [int(window) if t == "sliding_attention" else None for t in list(types)[:num_layers]]
    if getattr(model_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    return [int(window)] * num_layers


def unrun_parts(model: torch.nn.Module, model_policy: Any) -> List[str]:
    """Submodules holding parameters that the decode engine never runs: everything outside the parts the
    model policy names (layers, embed, position_embed, embed_norm, final norm, lm_head, rotary_emb).

    The decode engine runs exactly those parts; a model with anything else (OPT's ``project_in``/``project_out``
    when ``word_embed_proj_dim != hidden_size``, a vision tower, an extra adapter) would generate wrong tokens
    from it, so :func:`decode_problems` reports it and ``engine.generate`` falls back to Hugging Face.

    Example:
        >>> from policyinject.testing.presets import tiny_model
        >>> from policyinject_plugins.opt import OPT_CAUSAL_LM
        >>> unrun_parts(tiny_model("opt", word_embed_proj_dim=32), OPT_CAUSAL_LM)
        ['model.decoder.project_out', 'model.decoder.project_in']
        >>> unrun_parts(tiny_model("opt"), OPT_CAUSAL_LM)
        []
    """
    run = [model_policy.layers, model_policy.embed, model_policy.position_embed, model_policy.lm_head,
           model_policy.rotary_emb]
    for spec in (model_policy.final_norm, getattr(model_policy, "embed_norm", None)):
        if spec is not None:
            run.append(spec.path)
    prefixes = [p for p in run if p]
    out = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        out.append(name or "(the model itself)")
    return out


def decode_problems(model: torch.nn.Module, model_policy: Any, model_config: Any = None,
                    require_injected: bool = True) -> List[str]:
    """What the decode engine needs and this model lacks, one line each (empty: supported).

    With ``require_injected=False`` the layers are not checked for ``run`` (the plan-time check, before
    kernel injection has replaced them).
    """
    if model_policy is None:
        return [f"no model-level policy covers {type(model).__name__}: the decode engine needs one "
                "(ModelPolicy with layers, embed, lm_head and, for rotary models, rotary_emb)"]
    name = model_policy.model_name
    problems: List[str] = []
    for field in ("layers", "embed", "lm_head"):
        path = getattr(model_policy, field)
        if not path:
            problems.append(f"ModelPolicy for {name} has no `{field}`; the decode engine needs it")
        elif _get(model, path) is None:
            problems.append(f"ModelPolicy for {name}: `{field}` = {path!r} names no submodule of "
                            f"{type(model).__name__}")
    for field in ("position_embed", "rotary_emb"):
        path = getattr(model_policy, field)
        if path and _get(model, path) is None:
            problems.append(f"ModelPolicy for {name}: `{field}` = {path!r} names no submodule")
    for field in ("final_norm", "embed_norm"):
        spec = getattr(model_policy, field, None)
        if spec is not None and _get(model, spec.path) is None:
            problems.append(f"ModelPolicy for {name}: `{field}` = {spec.path!r} names no submodule")
    cfg = model_config if model_config is not None else getattr(model, "config", None)
    if getattr(cfg, "alibi", False) is True:
        problems.append(f"{name} uses ALiBi position biases inside its attention mask (config alibi=True); the "
                        "decode engine runs ALiBi only for policies that declare AttentionSpec.alibi")
    for key, neutral, field in _MODEL_LEVEL_KEYS:
        value = getattr(cfg, key, None)
        if value not in neutral and getattr(model_policy, field, None) is None:
            problems.append(f"{name}: the config sets {key}={value!r}, which the ModelPolicy does not declare "
                            f"(`{field}`); the decode engine would skip it")
    layers = _get(model, model_policy.layers) if model_policy.layers else None
    if layers is None or problems:
        return problems
    for part in unrun_parts(model, model_policy):
        problems.append(f"{part} ({type(_get(model, part) if part != '(the model itself)' else model).__name__}) "
                        f"holds parameters outside the parts ModelPolicy {name} names (layers, embed, "
                        "position_embed, embed_norm, final_norm, lm_head); the decode engine would not run it")
    if problems:
        return problems
    for i, layer in enumerate(layers):
        path = f"{model_policy.layers}.{i}"
        if require_injected and not callable(getattr(layer, "run", None)):
            problems.append(f"{path}: {type(layer).__name__} is not an injected block (no run(hidden, cos, sin, "
                            "attend)); the decode engine needs replace_with_kernel_inject=True and a layer policy "
                            "with a block wiring (pre_norm, parallel or post_norm; `opaque` keeps the layer)")
            break
        attn = getattr(layer, "attn", None)
        if require_injected and attn is not None and getattr(attn, "causal", True) is False:
            problems.append(f"{path}: {type(layer).__name__} has bidirectional attention; generation needs a "
                            "causal decoder")
            break
        if require_injected and attn is not None and getattr(cfg, "attn_logit_softcapping", None) \
                and getattr(attn, "softcap", None) is None:
            problems.append(f"{path}: the config sets attn_logit_softcapping but the injected attention does not "
                            "cap (the policy's AttentionSpec.logit_softcap is unset)")
            break
    return problems


class DecodeRunner:
    """The model-level forward over a static KV cache; see the module docstring.

    Example:
        >>> import torch
        >>> from policyinject.decode.kv_cache import StaticKVCache, prefill_mask
        >>> from policyinject.testing.presets import tiny_model
        >>> from policyinject_plugins.llama import LLAMA_CAUSAL_LM, LLAMA_LAYER
        >>> from policyinject.modules.block import InjectedBlock
        >>> model = tiny_model("llama")
        >>> for i, layer in enumerate(model.model.layers):
        ...     model.model.layers[i] = InjectedBlock.build(layer, LLAMA_LAYER, num_heads=4, num_kv_heads=2,
        ...                                                 head_dim=16, backend="torch")
        >>> runner = DecodeRunner(model, LLAMA_CAUSAL_LM)
        >>> runner.prepare(max_len=16)
        >>> cache = StaticKVCache(runner.num_layers, 16); cache.reserve(1)
        >>> ids = torch.tensor([[5, 6, 7]]); pos = torch.arange(3)[None]
        >>> mask = prefill_mask(torch.ones(1, 3), torch.float32)
        >>> logits = runner.forward(ids, pos, [cache.prefill_attend(i, mask) for i in range(2)], last_only=True)
        >>> torch.allclose(logits[:, -1], model(ids).logits[:, -1], atol=1e-5)
        True
    """

    def __init__(self, model: torch.nn.Module, model_policy: Any, model_config: Any = None) -> None:
        problems = decode_problems(model, model_policy, model_config)
        if problems:
            raise UnsupportedError("the decode engine cannot run this model:\n  " + "\n  ".join(problems))
        self.model = model
        self.policy = model_policy
        self.layers: Sequence[torch.nn.Module] = list(model.get_submodule(model_policy.layers))
        self.embed = model.get_submodule(model_policy.embed)
        self.position_embed = _get(model, model_policy.position_embed)
        self.final_norm = _get(model, model_policy.final_norm.path) if model_policy.final_norm else None
        self.lm_head = model.get_submodule(model_policy.lm_head)
        self.rotary = _get(model, model_policy.rotary_emb)
        cfg = model_config if model_config is not None else getattr(model, "config", None)
        embed_norm = getattr(model_policy, "embed_norm", None)
        self.embed_norm = _get(model, embed_norm.path) if embed_norm is not None else None
        self.embed_scale = read_value(cfg, getattr(model_policy, "embed_scale", None))
        self.logit_scale = read_value(cfg, getattr(model_policy, "logit_scale", None))
        self.final_softcap = read_value(cfg, getattr(model_policy, "final_logit_softcap", None)) or None
        #: Per layer, its rotary table key (``config.layer_types[i]``) when the rotary module keeps one per type.
        self.layer_types: Optional[List[str]] = None
        if getattr(model_policy, "rotary_per_layer_type", False):
            self.layer_types = list(getattr(cfg, "layer_types", None) or [])[:len(self.layers)]
            if len(self.layer_types) != len(self.layers):
                raise UnsupportedError(f"ModelPolicy for {model_policy.model_name} sets rotary_per_layer_type but "
                                       "the config has no layer_types for every layer")
        self.windows = layer_windows(cfg, len(self.layers))
        self.scales: List[Optional[float]] = [getattr(getattr(layer, "attn", None), "scaling", None)
                                              for layer in self.layers]
        #: Per layer, the keyword arguments its attends take beyond the mask: ``softcap`` and ``alibi`` slopes.
        self.attend_extras: List[dict] = []
        for layer in self.layers:
            attn = getattr(layer, "attn", None)
            extra = {}
            if getattr(attn, "softcap", None) is not None:
                extra["softcap"] = attn.softcap
            if getattr(attn, "alibi", None) is not None:
                extra["alibi"] = attn.alibi.to(self.device)
            self.attend_extras.append(extra)
        self.cos: Any = None
        self.sin: Any = None
        self._tables_for: Optional[Tuple[int, torch.dtype, torch.device]] = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def prepare(self, max_len: int) -> None:
        """Compute the rotary tables for positions ``[0, max_len)`` (once per length, dtype and device)."""
        key = (int(max_len), self.dtype, self.device)
        if self._tables_for == key or self.rotary is None:
            self._tables_for = key
            return
        x = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
        positions = torch.arange(max_len, device=self.device)[None]
        if self.layer_types is not None:
            self.cos, self.sin = {}, {}
            for t in dict.fromkeys(self.layer_types):
                cos, sin = self.rotary(x, positions, t)
                self.cos[t], self.sin[t] = cos[0].contiguous(), sin[0].contiguous()
        else:
            cos, sin = self.rotary(x, positions)
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self._tables_for = key

    def rotary_for(self, pos: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(cos, sin)`` as ``[B, T, R]`` for positions ``pos [B, T]`` (None, None without rotary)."""
        if self.rotary is None:
            return None, None
        if self.cos is None:
            raise RuntimeError("DecodeRunner.prepare(max_len) must run before the first forward")
        if isinstance(self.cos, dict):  # one table per layer type: {type: [B, T, R]}
            return ({t: c[pos] for t, c in self.cos.items()}, {t: s[pos] for t, s in self.sin.items()})
        return self.cos[pos], self.sin[pos]

    def embed_tokens(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus learned position embeddings (when the policy names them)."""
        h = self.embed(ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.position_embed is not None:
            offset = int(getattr(self.position_embed, "offset", 0) or 0)
            h = h + F.embedding(pos + offset, self.position_embed.weight)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        return h

    def rotary_in_attend(self) -> List[Optional[str]]:
        """Per layer, the rotary layout (``"half"``/``"interleaved"``) when the layer's attention can leave
        rotary to its ``attend`` (an injected attention told so by the ``NO_ROTARY`` marker), else None."""
        try:
            from ..modules.attention import NO_ROTARY, InjectedAttention  # noqa: F401
        except ImportError:  # pragma: no cover - ships with the package
            return [None] * self.num_layers
        out: List[Optional[str]] = []
        for layer in self.layers:
            attn = getattr(layer, "attn", None)
            ok = (self.rotary is not None and self.layer_types is None and isinstance(attn, InjectedAttention)
                  and getattr(attn, "rotary", None) in ("half", "interleaved")
                  and getattr(attn, "rotary_tables", None) is None)
            out.append(attn.rotary if ok else None)
        return out

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attends: Sequence[Any],
                last_only: bool = False, rotary_in_attend: Optional[Sequence[Optional[str]]] = None,
                tables: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
                last_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``) for tokens ``ids [B, T]`` at rotary
        positions ``pos [B, T]``, one ``attend`` per layer.

        ``rotary_in_attend`` marks layers whose ``attend`` applies rotary itself (the block gets the
        ``NO_ROTARY`` marker instead of the tables); ``tables`` passes precomputed ``(cos, sin)`` rows;
        ``last_index`` (a one-element device tensor, with ``last_only``) names the position whose logits are
        returned instead of the last one (a right-padded prompt, :mod:`policyinject.decode.prefill`)."""
        h = self.embed_tokens(ids, pos)
        cos, sin = tables if tables is not None else self.rotary_for(pos)
        skip = None
        if rotary_in_attend is not None and any(rotary_in_attend):
            from ..modules.attention import NO_ROTARY

            skip = NO_ROTARY
        # Pre-norm blocks leave their last residual add to the next block's first norm (one fused kernel):
        # the hidden state is h + pending while pending is not None.
        pending: Optional[torch.Tensor] = None
        for i, (layer, attend) in enumerate(zip(self.layers, attends)):
            c, s_ = (skip, None) if (skip is not None and rotary_in_attend[i]) else (cos, sin)
            if isinstance(c, dict):
                c, s_ = c[self.layer_types[i]], s_[self.layer_types[i]]
            if getattr(layer, "defers_residual", False):
                pending, h = layer.run_deferred(h, pending, c, s_, attend)
                continue
            if pending is not None:
                h, pending = h + pending, None
            h = layer.run(h, c, s_, attend)
        if last_only and last_index is not None:
            h = h.index_select(1, last_index)
            pending = pending.index_select(1, last_index) if pending is not None else None
        elif last_only and h.shape[1] > 1:
            h = h[:, -1:]
            pending = pending[:, -1:] if pending is not None else None
        if pending is not None and hasattr(self.final_norm, "forward_add"):
            h, _ = self.final_norm.forward_add(pending, h)
        else:
            if pending is not None:
                h = h + pending
            if self.final_norm is not None:
                h = self.final_norm(h)
        out = self.lm_head(h)
        out = out[0] if isinstance(out, tuple) else out
        if self.logit_scale is not None:
            out = out * self.logit_scale
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out
