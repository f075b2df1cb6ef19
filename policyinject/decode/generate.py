"""The decode engine's ``generate``: an eager prefill, then one decode step per token over a static KV cache,
replayed from CUDA graphs when ``enable_cuda_graph`` is on.

One step function serves both modes, so ``enable_cuda_graph=False`` runs the very same kernels with the same
shapes (on a GPU the tokens match the graph run's; see docs/decode.md for the one exception, split-K
matmuls with atomic adds). A step reads the current token, positions, the cache slot and the masks from a
:class:`~policyinject.decode.state.DecodeState`, writes K/V into the cache, and -- for greedy decoding --
chooses the next token, records it and moves every counter on, all on the device: the host loop only
replays. Sampling runs the model step from the graph and draws the token eagerly (a ``torch.Generator``
stays usable and reproducible). EOS is checked on the host every ``eos_check_interval`` steps only.

What :meth:`Decoder.generate` returns: a new ``LongTensor [B, T + n]`` on the model's device -- the prompt
as given (left padding included), then ``n`` generated tokens, where ``n`` is ``max_new_tokens`` or, when
every row produced an EOS token earlier, the step at which the last row did; rows that finished earlier
are filled with ``pad_token_id`` (Hugging Face's contract). It never aliases the engine's buffers: a later
call cannot change it.

Example:
    >>> import torch
    >>> from policyinject.pipeline import init_inference
    >>> from policyinject.presets import tiny_model
    >>> model = tiny_model("llama")
    >>> ids = torch.tensor([[5, 6, 7, 8]])
    >>> expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    >>> engine = init_inference(model, replace_with_kernel_inject=True, dtype="fp32")
    >>> decoder = Decoder.from_engine(engine, use_graphs=False)
    >>> torch.equal(decoder.generate(ids, max_new_tokens=5), expected)
    True
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch

from ..errors import UnsupportedError
from ..kernels._common import use_triton
from .graphs import GraphCache, require_cuda
from .kv_cache import StaticKVCache, decode_mask, prefill_mask, span_for
from .runner import DecodeRunner, decode_problems
from .sampling import Sampler, greedy
from .state import DecodeState

__all__ = ["Decoder", "GenerateParams", "resolve_params", "make_decoder_factory"]

#: Hugging Face's defaults for keys a model's generation config leaves unset.
_HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
_OWN_KEYS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
             "top_k", "top_p", "eos_token_id", "pad_token_id")
#: Hugging Face keys accepted when they ask for nothing beyond what this engine does.
_NEUTRAL = {"use_cache": (True, None), "num_beams": (1, None), "num_return_sequences": (1, None),
            "return_dict_in_generate": (False, None), "output_scores": (False, None),
            "output_logits": (False, None), "output_attentions": (False, None),
            "output_hidden_states": (False, None), "repetition_penalty": (1.0, None), "streamer": (None,),
            "logits_processor": (None,), "stopping_criteria": (None,), "min_p": (None,),
            "typical_p": (1.0, None), "cache_implementation": (None, "static")}


@attrs.frozen
class GenerateParams:
    """Resolved generation parameters of one call (after defaults, model generation config, kwargs)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    sampler: Sampler = attrs.field(factory=Sampler)
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: int = 0


def _as_tuple(value: Any) -> Tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def resolve_params(prompt_len: int, kwargs: Dict[str, Any], model_generation_config: Any = None,
                   generation_config: Any = None, device: Any = "cpu") -> GenerateParams:
    """Hugging Face layering: HF defaults < the model's generation config < ``generation_config`` < kwargs.

    Unknown or unsupported keyword arguments raise :class:`UnsupportedError` naming them.

    Example:
        >>> p = resolve_params(4, {"max_length": 10, "eos_token_id": [1, 2]})
        >>> p.max_new_tokens, p.eos_token_id, p.pad_token_id, p.sampler.greedy
        (6, (1, 2), 1, True)
    """
    kwargs = dict(kwargs)
    generator = kwargs.pop("generator", None)
    seed = kwargs.pop("seed", None)
    bad = []
    for key in list(kwargs):
        if key in _OWN_KEYS:
            continue
        if key in _NEUTRAL and any(kwargs[key] is v or kwargs[key] == v for v in _NEUTRAL[key]):
            kwargs.pop(key)
            continue
        bad.append(f"{key}={kwargs[key]!r}")
    if bad:
        raise UnsupportedError(
            "the decode engine's generate does not support " + ", ".join(bad) + "; supported: "
            + ", ".join(_OWN_KEYS + ("generator", "seed", "attention_mask"))
            + ". For anything else call engine.module.generate(...) (Hugging Face's loop over the injected model)")
    merged: Dict[str, Any] = dict(_HF_DEFAULTS)
    for source in (model_generation_config, generation_config):
        if source is None:
            continue
        for key in _OWN_KEYS:
            value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
            if value is not None:
                merged[key] = value
    user = {k: v for k, v in kwargs.items() if v is not None}
    merged.update(user)
    default_max_length = merged.get("max_length") == _HF_DEFAULTS["max_length"] and not any(
        _given(src, "max_length") for src in (model_generation_config, generation_config, user))
    if "max_new_tokens" in user or ("max_length" not in user and merged.get("max_new_tokens") is not None):
        new = int(merged["max_new_tokens"])
    elif default_max_length:  # Hugging Face: "by default let's always generate 20 new tokens"
        new = int(merged["max_length"])
    else:
        new = int(merged["max_length"]) - prompt_len
    if new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens resolves to {new} for a prompt of {prompt_len} "
                         "tokens; pass max_new_tokens=N")
    if merged.get("min_new_tokens") is not None:
        min_new = int(merged["min_new_tokens"])
    else:
        min_new = max(int(merged.get("min_length") or 0) - prompt_len, 0)
    eos = _as_tuple(merged.get("eos_token_id"))
    pad = merged.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    if isinstance(pad, torch.Tensor):
        pad = int(pad.flatten()[0])
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    top_k = merged.get("top_k")
    top_p = merged.get("top_p")
    sampler = Sampler(do_sample=bool(merged.get("do_sample")), temperature=float(merged.get("temperature") or 1.0),
                      top_k=int(top_k) if top_k else None, top_p=float(top_p) if top_p is not None else None,
                      generator=generator)
    return GenerateParams(max_new_tokens=new, min_new_tokens=min_new, sampler=sampler, eos_token_id=eos,
                          pad_token_id=int(pad))


def _given(source: Any, key: str) -> bool:
    if source is None:
        return False
    value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
    return value is not None


class Decoder:
    """Static-cache generation over injected blocks, eager or from CUDA graphs; see the module docstring.

    ``max_len`` is the cache length (the config's ``max_out_tokens``: prompt plus new tokens);
    ``batch_capacity`` the config's ``max_batch_size`` (None: sized by the first call, grown on demand);
    ``graph_cache_size`` bounds the captured graphs (least recently used evicted).
    """

    def __init__(self, model: torch.nn.Module, model_policy: Any, *, model_config: Any = None, max_len: int = 1024,
                 batch_capacity: Optional[int] = None, use_graphs: bool = False, graph_cache_size: int = 8,
                 eos_check_interval: int = 16, min_span: int = 256, backend: str = "auto") -> None:
        self.runner = DecodeRunner(model, model_policy, model_config)
        self.model = model
        self.max_len = int(max_len)
        self.max_batch_size = int(batch_capacity) if batch_capacity else None
        self.cache = StaticKVCache(self.runner.num_layers, self.max_len, self.max_batch_size)
        self.use_graphs = bool(use_graphs)
        if self.use_graphs:
            require_cuda()
            if self.runner.device.type != "cuda":
                raise UnsupportedError(
                    f"enable_cuda_graph=True needs the model on a CUDA device; it is on {self.runner.device} "
                    "(keep_module_on_host=True keeps it on the host)")
        self.graphs = GraphCache(graph_cache_size)
        self.eos_check_interval = max(int(eos_check_interval), 1)
        self.min_span = int(min_span)
        #: Kernel backend of the decode attention ("auto": the Triton kernel on CUDA, PyTorch elsewhere).
        self.backend = str(backend or "auto")
        #: Apply rotary inside the Triton decode attention (instead of the block's own rotary launch).
        self.fuse_rotary = True
        self._states: "OrderedDict[int, DecodeState]" = OrderedDict()
        self._state_generation = self.cache.generation

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def from_engine(cls, engine: Any, use_graphs: bool = False) -> "Decoder":
        """Build from an :class:`~policyinject.engine.InferenceEngine` (its config and pass context)."""
        ctx = engine._context
        return cls.from_context(engine.module, ctx, use_graphs)

    @classmethod
    def from_context(cls, model: torch.nn.Module, ctx: Any, use_graphs: bool) -> "Decoder":
        config = getattr(ctx, "config", None)
        return cls(model, getattr(ctx, "model_policy", None), model_config=getattr(ctx, "model_config", None),
                   max_len=int(getattr(config, "max_out_tokens", 1024) or 1024),
                   batch_capacity=getattr(config, "max_batch_size", None), use_graphs=use_graphs,
                   graph_cache_size=int(getattr(config, "cuda_graph_cache_size", 8) or 8),
                   backend=str(getattr(config, "kernel_backend", "auto") or "auto"))

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def stats(self) -> dict:
        """Graph captures, replays and evictions; graphs held; KV-cache bytes."""
        return {**self.graphs.stats, "graphs": len(self.graphs), "kv_cache_bytes": self.cache.nbytes()}

    # -------------------------------------------------------------------------------------------- state
    def _state(self, batch: int, vocab: int) -> DecodeState:
        if self.cache.generation != self._state_generation:
            self._states.clear()
            self.graphs.drop()
            self._state_generation = self.cache.generation
        st = self._states.get(batch)
        if st is None or st.vocab != vocab:
            st = DecodeState(batch, self.max_len, vocab, self.device)
            self._states[batch] = st
            self.graphs.drop(lambda key: key[0] == batch)
            while len(self._states) > self.graphs.capacity:
                old, _ = self._states.popitem(last=False)  # least recently used batch size goes, graphs too
                self.graphs.stats["evictions"] += self.graphs.drop(lambda key, old=old: key[0] == old)
        else:
            self._states.move_to_end(batch)
        return st

    # ------------------------------------------------------------------------------------------ compute
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (left-padded ``[B, T]``), fill cache slots ``[0, T)``; logits of the last
        position, ``[B, V]`` float32."""
        b, t = input_ids.shape
        self.cache.reserve(b)
        self.runner.prepare(self.max_len)
        dtype = self.runner.dtype
        masks = {w: prefill_mask(attention_mask, dtype, w) for w in set(self.runner.windows)}
        attends = [self.cache.prefill_attend(i, masks[w], s, **self.runner.attend_extras[i])
                   for i, (w, s) in enumerate(zip(self.runner.windows, self.runner.scales))]
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = self.runner.forward(input_ids, pos, attends, last_only=True)
        return logits[:, -1].float()

    def _step_fn(self, st: DecodeState, span: int, greedy_select: bool, suppress: bool) -> Callable[[], None]:
        """The decode step on ``st`` attending over ``span`` slots; the same function runs eagerly and is
        what a graph captures."""
        runner, cache, b = self.runner, self.cache, st.batch
        dtype = runner.dtype
        windows, scales = runner.windows, runner.scales

        backend = self.backend
        kernel = use_triton(backend, cache.k[0])
        # on the Triton path the attention kernel also applies rotary: one launch less per layer
        fused = runner.rotary_in_attend() if (kernel and self.fuse_rotary) else [None] * runner.num_layers

        def step() -> None:
            st.kv_mask.index_fill_(1, st.cache_pos, True)
            masks = {} if kernel else {w: decode_mask(st.kv_mask, st.cache_pos, span, dtype, w, st.slots)
                                       for w in set(windows)}
            pos = st.pos[:, None]
            cos, sin = runner.rotary_for(pos)
            attends = [cache.decode_attend(i, b, span, st.cache_pos, st.kv_mask, masks.get(w), s, w, backend,
                                           fused[i], cos, sin, **runner.attend_extras[i])
                       for i, (w, s) in enumerate(zip(windows, scales))]
            logits = runner.forward(st.tokens[:, None], pos, attends, last_only=True, rotary_in_attend=fused,
                                    tables=(cos, sin))[:, -1]
            st.consumed()
            if greedy_select:  # argmax of the 16-bit logits = argmax of their exact float32 copy
                if suppress:
                    logits = logits.masked_fill(st.eos_suppressed(), float("-inf"))
                st.advance(greedy(logits))
            else:
                st.logits.copy_(logits)

        return step

    def _decode(self, st: DecodeState, prompt_len: int, params: GenerateParams) -> int:
        """Steps 1 .. max_new_tokens - 1; returns how many tokens were generated (prefill's included)."""
        sampler = params.sampler
        suppress = params.min_new_tokens > 0 and bool(params.eos_token_id)
        check_eos = bool(params.eos_token_id)
        steps: Dict[int, Callable[[], None]] = {}
        kernel = use_triton(self.backend, self.cache.k[0])
        generated = 1
        for i in range(1, params.max_new_tokens):
            if check_eos and i % self.eos_check_interval == 0 and bool(st.finished.all()):
                break
            # the Triton kernel stops at cache_pos on the device: one span (one graph per batch) suffices
            span = self.max_len if kernel else span_for(prompt_len + i, self.max_len, self.min_span)
            fn = steps.get(span)
            if fn is None:
                fn = steps[span] = self._step_fn(st, span, sampler.greedy, suppress)
            if self.use_graphs:
                key = (st.batch, span, sampler.greedy, suppress, kernel, self.cache.generation)
                self.graphs.run(key, fn, st.snapshot)
            else:
                fn()
            if not sampler.greedy:
                st.advance(sampler(st.logits, st.eos_suppressed() if suppress else None))
            generated += 1
        return generated

    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 generation_config: Any = None, **kwargs: Any) -> torch.Tensor:
        """Generate tokens; Hugging Face ``generate`` keyword names.

        Supported: ``max_new_tokens``, ``max_length``, ``min_new_tokens``, ``min_length``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ``attention_mask``
        (left padding), ``generation_config``, and ``generator`` (a ``torch.Generator`` on the model's
        device) or ``seed``. Returns a new ``[B, T + n]`` tensor (see the module docstring).
        """
        if input_ids is None:  # Hugging Face names the first argument ``inputs``
            input_ids = kwargs.pop("inputs", None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, tokens] tensor of token ids")
        device = self.device
        ids = input_ids.to(device=device, dtype=torch.long)
        b, t = ids.shape
        model_gc = getattr(self.model, "generation_config", None)
        params = resolve_params(t, kwargs, model_gc, generation_config, device)
        if attention_mask is None:
            attention_mask = _default_mask(ids, params)
        mask = attention_mask.to(device=device)
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("right padding detected: the decode engine needs left-padded prompts "
                             "(tokenizer.padding_side = 'left')")
        if t + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({t} tokens) + max_new_tokens ({params.max_new_tokens}) = {t + params.max_new_tokens} "
                f"exceeds the KV cache of max_out_tokens={self.max_len}; raise `max_out_tokens` in the config")
        if self.max_batch_size is not None and b > self.max_batch_size:
            raise ValueError(f"a batch of {b} exceeds `max_batch_size` = {self.max_batch_size} in the config")
        with torch.inference_mode():
            logits = self.prefill(ids, mask)
            st = self._state(b, logits.shape[-1])
            st.start(mask, params.eos_token_id, params.pad_token_id, params.min_new_tokens)
            suppress = st.eos_suppressed() if (params.min_new_tokens > 0 and params.eos_token_id) else None
            st.advance(params.sampler(logits, suppress))
            n = self._decode(st, t, params)
            length = n
            if params.eos_token_id:
                length = _finished_length(st, n)
            return torch.cat([ids, st.out[:, :length]], dim=1)


def _default_mask(ids: torch.Tensor, params: GenerateParams) -> torch.Tensor:
    """Hugging Face's inference: pad tokens (when pad is not an EOS token) are masked, else all ones."""
    pad = params.pad_token_id
    if pad is not None and pad not in params.eos_token_id and bool((ids == pad).any()):
        return (ids != pad).long()
    return torch.ones_like(ids)


def _finished_length(st: DecodeState, n: int) -> int:
    """Tokens to keep: up to the step at which the last row produced EOS, else all ``n`` (one sync)."""
    is_eos = st.eos_vocab[st.out[:, :n]]
    done = is_eos.any(dim=1)
    first = torch.where(done, is_eos.int().argmax(dim=1), torch.full_like(done, n - 1, dtype=torch.long))
    all_done = bool(done.all())
    return int(first.max()) + 1 if all_done else n


def make_decoder_factory(ctx: Any, use_graphs: bool, when_unsupported: str = "raise"
                         ) -> Callable[[Any], Optional[Decoder]]:
    """The ``ctx.notes["decoder_factory"]`` a pass installs: ``factory(engine) -> Decoder``.

    ``when_unsupported="none"`` makes the factory return None for a model the decode engine cannot run
    (layers not injected, no model policy, ALiBi, ...), so that ``engine.generate`` falls back to the model's
    own ``generate``: the right choice for the ``kernel_inject`` pass, which injects models the decoder may
    not support. The ``cuda_graph`` pass keeps ``"raise"`` (it checked support when planning).

    Example:
        >>> import torch
        >>> from policyinject.passes.base import PassContext
        >>> from policyinject.presets import tiny_model
        >>> ctx = PassContext(model=tiny_model("llama"), config=None)   # no model policy, nothing injected
        >>> engine = type("E", (), {"module": ctx.model, "_context": ctx})()
        >>> make_decoder_factory(ctx, use_graphs=False, when_unsupported="none")(engine) is None
        True
    """
    if when_unsupported not in ("raise", "none"):
        raise ValueError(f"when_unsupported must be 'raise' or 'none', got {when_unsupported!r}")

    def factory(engine: Any) -> Optional[Decoder]:
        context = ctx if ctx is not None else engine._context
        if when_unsupported == "none":
            problems = decode_problems(engine.module, getattr(context, "model_policy", None),
                                       getattr(context, "model_config", None))
            if problems:
                warnings.warn(f"engine.generate uses Hugging Face generate, not the decode engine: {problems[0]}",
                              UserWarning, stacklevel=4)
                return None
        return Decoder.from_context(engine.module, context, use_graphs)

    return factory
