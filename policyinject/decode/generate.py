"""The decode engine's ``generate``: a prefill (on a GPU padded to a length bucket and, with
``enable_cuda_graph``, replayed from a CUDA graph), then one decode step per token over a static KV cache,
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
    >>> from policyinject.testing.presets import tiny_model
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
from typing import Any, Callable, Dict, Optional

import torch

from ..errors import NonFiniteLogitsError, UnsupportedError
from ..kernels._common import use_triton
from .concurrency import CallLock
from .graphs import GraphCache, require_cuda
from .kv_cache import StaticKVCache, decode_mask, prefill_mask, span_for
from .params import GenerateParams, resolve_params
from .prefill import BucketedPrefill
from .runner import DecodeRunner, decode_problems
from .sampling import flag_nonfinite, greedy, penalize
from .state import DecodeState
from .streaming import check_streamer, put
from .validate import check_inputs, check_mask

__all__ = ["Decoder", "GenerateParams", "resolve_params", "build_decoder"]

class Decoder:
    """Static-cache generation over injected blocks, eager or from CUDA graphs; see the module docstring.

    ``max_len`` is the cache length (the config's ``max_out_tokens``: prompt plus new tokens);
    ``batch_capacity`` the config's ``max_batch_size`` (None: sized by the first call, grown on demand);
    ``graph_cache_size`` bounds the captured graphs (least recently used evicted); ``collectives`` says that
    the steps hold tensor-parallel all-reduces (captured with them; see :mod:`policyinject.decode.graphs`).
    """

    def __init__(self, model: torch.nn.Module, model_policy: Any, *, model_config: Any = None, max_len: int = 1024,
                 batch_capacity: Optional[int] = None, use_graphs: bool = False, graph_cache_size: int = 8,
                 eos_check_interval: int = 16, min_span: int = 256, backend: str = "auto",
                 collectives: bool = False) -> None:
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
        self.graphs = GraphCache(graph_cache_size, collectives=collectives)
        self.eos_check_interval = max(int(eos_check_interval), 1)
        self.min_span = int(min_span)
        #: Kernel backend of the decode attention ("auto": the Triton kernel on CUDA, PyTorch elsewhere).
        self.backend = str(backend or "auto")
        #: Apply rotary inside the Triton decode attention (instead of the block's own rotary launch).
        self.fuse_rotary = True
        #: Prefill right-padded to length buckets (on a GPU): the same function eager or replayed from a graph
        #: (``decode/prefill.py``); False: the prompt runs at its own length, eagerly.
        self.prefill_buckets = self.runner.device.type == "cuda"
        self._prefill = BucketedPrefill(self.runner, self.cache, self.use_graphs)
        self._states: "OrderedDict[int, DecodeState]" = OrderedDict()
        self._state_generation = self.cache.generation
        #: Serialises ``generate`` calls: the cache and state buffers are shared by every call.
        self._lock = CallLock()

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def from_engine(cls, engine: Any, use_graphs: bool = False) -> "Decoder":
        """Build from an :class:`~policyinject.engine.InferenceEngine` (its model and plan)."""
        return cls.from_plan(engine.module, engine.plan, use_graphs)

    @classmethod
    def from_plan(cls, model: torch.nn.Module, plan: Any, use_graphs: Optional[bool] = None) -> "Decoder":
        """Build from a :class:`~policyinject.plan.Plan`: its model policy, model config and decode description
        (``use_graphs`` None: the description's). Raises ``UnsupportedError`` for a model it cannot run."""
        d = plan.decode
        if d is None:
            from ..plan_fields import DecodeDescription

            d = DecodeDescription(use_graphs=bool(use_graphs))
        tp = plan.tensor_parallel
        return cls(model, plan.model_policy, model_config=plan.model_config, max_len=d.max_len,
                   batch_capacity=d.batch_capacity, use_graphs=d.use_graphs if use_graphs is None else use_graphs,
                   graph_cache_size=d.graph_cache_size, backend=d.backend,
                   collectives=tp is not None and tp.tp_size > 1)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def vocab_size(self) -> int:
        """The global vocabulary (a vocabulary-parallel embedding holds a shard but keeps ``num_embeddings``)."""
        embed = self.runner.embed
        return int(getattr(embed, "num_embeddings", None) or embed.weight.shape[0])

    @property
    def stats(self) -> dict:
        """Graph captures, replays and evictions; graphs held; KV-cache bytes."""
        return {**self.graphs.stats, "graphs": len(self.graphs), "kv_cache_bytes": self.cache.nbytes(),
                **self._prefill.stats_dict()}

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
        position, ``[B, V]`` float32, a new tensor. With :attr:`prefill_buckets` (the GPU default) the prompt is
        right-padded to a length bucket and, with graphs on, replayed from a CUDA graph
        (:mod:`policyinject.decode.prefill`; slots up to the bucket hold pad K/V that decoding overwrites)."""
        b, t = input_ids.shape
        self.cache.reserve(b)
        self.runner.prepare(self.max_len)
        if self.prefill_buckets:
            return self._prefill.run(input_ids, attention_mask)
        dtype = self.runner.dtype
        masks = {w: prefill_mask(attention_mask, dtype, w) for w in set(self.runner.windows)}
        attends = [self.cache.prefill_attend(i, masks[w], s, **self.runner.attend_extras[i])
                   for i, (w, s) in enumerate(zip(self.runner.windows, self.runner.scales))]
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = self.runner.forward(input_ids, pos, attends, last_only=True)
        return logits[:, -1].float()

    def _step_fn(self, st: DecodeState, span: int, greedy_select: bool, suppress: bool,
                 penalty: bool = False) -> Callable[[], None]:
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
            if greedy_select and not (penalty or suppress):
                # argmax of the 16-bit logits = argmax of their exact float32 copy; the non-finite check
                # shares the argmax's maxima
                st.advance(greedy(logits, st.nonfinite))
                return
            flag_nonfinite(st.nonfinite, logits)
            if greedy_select:
                if penalty:  # Hugging Face applies the penalty to the float32 copy
                    logits = penalize(logits.float(), st.seen, st.penalty)
                if suppress:
                    logits = logits.masked_fill(st.eos_suppressed(), float("-inf"))
                st.advance(greedy(logits))
            else:
                st.logits.copy_(logits)

        return step

    def _decode(self, st: DecodeState, prompt_len: int, params: GenerateParams, streamer: Any = None) -> int:
        """Steps 1 .. max_new_tokens - 1; returns how many tokens were generated (prefill's included).

        With a streamer, each step's tokens are handed over (one host synchronisation per token), and
        since the tokens are on the host anyway, EOS is checked at every step (Hugging Face's stopping
        point exactly); without one, every ``eos_check_interval`` steps only (when an EOS token is set; a
        set non-finite flag stops the loop at the same checks)."""
        sampler = params.sampler
        suppress = params.min_new_tokens > 0 and bool(params.eos_token_id)
        penalty = sampler.repetition_penalty is not None
        check_eos = bool(params.eos_token_id)
        steps: Dict[int, Callable[[], None]] = {}
        kernel = use_triton(self.backend, self.cache.k[0])
        generated = 1
        for i in range(1, params.max_new_tokens):
            if check_eos and (streamer is not None or i % self.eos_check_interval == 0):
                if bool(st.finished.all() | st.nonfinite.any()):  # one sync: EOS everywhere, or garbage
                    break
            # the Triton kernel stops at cache_pos on the device: one span (one graph per batch) suffices
            span = self.max_len if kernel else span_for(prompt_len + i, self.max_len, self.min_span)
            fn = steps.get(span)
            if fn is None:
                fn = steps[span] = self._step_fn(st, span, sampler.greedy, suppress, penalty)
            if self.use_graphs:
                key = (st.batch, span, sampler.greedy, suppress, penalty, kernel, self.cache.generation)
                self.graphs.run(key, fn, st.snapshot)
            else:
                fn()
            if not sampler.greedy:
                st.advance(sampler(st.logits, st.eos_suppressed() if suppress else None, st.seen, st.nonfinite))
            generated += 1
            if streamer is not None:
                put(streamer, st.tokens)
        return generated

    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 generation_config: Any = None, **kwargs: Any) -> torch.Tensor:
        """Generate tokens; Hugging Face ``generate`` keyword names.

        Supported: ``max_new_tokens``, ``max_length``, ``min_new_tokens``, ``min_length``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``num_return_sequences``
        (sampling), ``eos_token_id``, ``pad_token_id``, ``attention_mask`` (left padding),
        ``generation_config``, ``streamer`` (Hugging Face's ``put``/``end`` protocol), and ``generator`` (a
        ``torch.Generator`` on the model's device) or ``seed``. Returns a new ``[B, T + n]`` tensor (see the
        module docstring). Calls on one decoder from several threads run one at a time.

        Raises ``ValueError`` / ``TypeError`` for malformed inputs and parameters (Hugging Face's types),
        :class:`~policyinject.errors.UnsupportedError` for Hugging Face features this loop lacks, and
        :class:`~policyinject.errors.NonFiniteLogitsError` when the model produced logits no token can be
        chosen from.
        """
        if input_ids is None:  # Hugging Face names the first argument ``inputs``
            input_ids = kwargs.pop("inputs", None)
        streamer = check_streamer(kwargs.pop("streamer", None))
        ids, mask = check_inputs(input_ids, attention_mask, self.vocab_size)
        device = self.device
        ids = ids.to(device=device)
        b, t = ids.shape
        model_gc = getattr(self.model, "generation_config", None)
        params = resolve_params(t, kwargs, model_gc, generation_config, device,
                                vocab_size=self.vocab_size)
        if mask is None:
            try:
                mask = check_mask(_default_mask(ids, params), ids)
            except ValueError as e:
                raise ValueError(f"{e} (no attention_mask was given; it was inferred from the positions of "
                                 f"pad_token_id={params.pad_token_id} in input_ids, as Hugging Face does: pass "
                                 "attention_mask explicitly)") from None
        mask = mask.to(device=device)
        if params.num_return_sequences > 1:  # Hugging Face: each prompt repeated, its copies adjacent
            ids = ids.repeat_interleave(params.num_return_sequences, dim=0)
            mask = mask.repeat_interleave(params.num_return_sequences, dim=0)
            b = ids.shape[0]
        if t + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({t} tokens) + max_new_tokens ({params.max_new_tokens}) = {t + params.max_new_tokens} "
                f"exceeds the KV cache of max_out_tokens={self.max_len}; raise `max_out_tokens` in the config")
        if self.max_batch_size is not None and b > self.max_batch_size:
            raise ValueError(f"a batch of {b} exceeds `max_batch_size` = {self.max_batch_size} in the config")
        with self._lock, torch.inference_mode():
            try:
                return self._generate(ids, mask, params, streamer)
            except BaseException:
                if streamer is not None:  # a consumer waiting on the stream (TextIteratorStreamer) is released
                    try:
                        streamer.end()
                    except Exception:  # the original error matters more
                        pass
                raise

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, params: GenerateParams, streamer: Any
                  ) -> torch.Tensor:
        t = ids.shape[1]
        if streamer is not None:
            put(streamer, ids)
        logits = self.prefill(ids, mask)
        st = self._state(ids.shape[0], logits.shape[-1])
        sampler = params.sampler
        st.start(mask, params.eos_token_id, params.pad_token_id, params.min_new_tokens, input_ids=ids,
                 penalty=sampler.repetition_penalty)
        flag_nonfinite(st.nonfinite, logits)
        suppress = st.eos_suppressed() if (params.min_new_tokens > 0 and params.eos_token_id) else None
        st.advance(sampler(logits, suppress, st.seen, st.nonfinite))
        if streamer is not None:
            put(streamer, st.tokens)
        n = self._decode(st, t, params, streamer)
        if bool(st.nonfinite.any()):
            raise NonFiniteLogitsError(
                f"generation stopped: the model produced logits with NaN or +inf (or a row of all -inf) within "
                f"the first {n} generated token(s) of a [{ids.shape[0]}, {t}] prompt, so no token could be chosen "
                f"from them. Check the dtype ({self.runner.dtype}; fp16 overflows easily: try bf16 or fp32) and "
                "the weights")
        length = _finished_length(st, n) if params.eos_token_id else n
        if streamer is not None:
            streamer.end()
        return torch.cat([ids, st.out[:, :length]], dim=1)


def _default_mask(ids: torch.Tensor, params: GenerateParams) -> torch.Tensor:
    """Hugging Face's inference: pad tokens (when pad is not an EOS token) are masked, else all ones (which
    ``ids != pad`` also is when no pad token occurs: no synchronisation to ask)."""
    pad = params.pad_token_id
    if pad is not None and pad not in params.eos_token_id:
        return (ids != pad).long()
    return torch.ones_like(ids)


def _finished_length(st: DecodeState, n: int) -> int:
    """Tokens to keep: up to the step at which the last row produced EOS, else all ``n`` (one sync)."""
    is_eos = st.eos_vocab[st.out[:, :n]]
    done = is_eos.any(dim=1)
    first = torch.where(done, is_eos.int().argmax(dim=1), torch.full_like(done, n - 1, dtype=torch.long))
    all_done = bool(done.all())
    return int(first.max()) + 1 if all_done else n


def build_decoder(model: torch.nn.Module, plan: Any) -> Optional[Decoder]:
    """The decoder ``plan.decode`` describes, or None: no description (the model's own ``generate`` is used),
    or a model the decode engine cannot run when the description says to fall back.

    Example:
        >>> from policyinject.plan import Plan
        >>> from policyinject.plan_fields import DecodeDescription
        >>> build_decoder(None, Plan()) is None
        True
        >>> build_decoder(None, Plan(decode=DecodeDescription(False, problems=("ALiBi",)))) is None
        True
    """
    d = plan.decode
    if d is None:
        return None
    if d.problems and d.when_unsupported == "fallback":
        warnings.warn(f"engine.generate uses Hugging Face generate, not the decode engine: {d.problems[0]}",
                      UserWarning, stacklevel=4)
        return None
    return Decoder.from_plan(model, plan)
