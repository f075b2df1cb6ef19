"""The generation parameters of one ``generate`` call: Hugging Face layering, validated as Hugging Face does.

:func:`resolve_params` merges Hugging Face's defaults, the model's ``generation_config``, a
``generation_config`` argument and the keyword arguments (later wins), then checks every value the way
``transformers`` 5.x ``generate`` does, raising the same exception type (``ValueError`` for a bad value,
as Hugging Face's warpers and ``GenerationConfig.validate`` do; ``TypeError`` for a value of the wrong kind
where Hugging Face checks nothing) with a message naming the argument as the user spelled it. Keys Hugging
Face knows but this decode loop does not implement (``num_beams > 1``, ``logits_processor``, ...) raise
:class:`~policyinject.errors.UnsupportedError`; keys nobody knows raise ``ValueError`` as Hugging Face does.

Example:
    >>> p = resolve_params(4, {"max_length": 10, "eos_token_id": [1, 2]})
    >>> p.max_new_tokens, p.eos_token_id, p.pad_token_id, p.sampler.greedy
    (6, (1, 2), 1, True)
    >>> try:
    ...     resolve_params(4, {"do_sample": True, "temperature": 0.0, "max_new_tokens": 3})
    ... except ValueError as e:
    ...     print(str(e)[:60])
    `temperature` (=0.0) has to be a strictly positive float whe
"""

from __future__ import annotations

import functools

import math
import numbers
from typing import Any, Dict, FrozenSet, Optional, Tuple

import attrs
import torch

from ..errors import UnsupportedError
from .sampling import Sampler

__all__ = ["GenerateParams", "resolve_params", "hf_generation_keys"]

#: Hugging Face's defaults for keys a model's generation config leaves unset.
_HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
#: Keys this decode loop implements (besides ``generator``, ``seed``, ``streamer``, ``attention_mask``).
_OWN_KEYS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
             "top_k", "top_p", "min_p", "repetition_penalty", "num_return_sequences", "eos_token_id",
             "pad_token_id")
#: Hugging Face keys accepted when they ask for nothing beyond what this engine does.
_NEUTRAL = {"use_cache": (True, None), "num_beams": (1, None), "return_dict_in_generate": (False, None),
            "output_scores": (False, None), "output_logits": (False, None), "output_attentions": (False, None),
            "output_hidden_states": (False, None), "logits_processor": (None,), "stopping_criteria": (None,),
            "typical_p": (1.0, None), "cache_implementation": (None, "static"), "num_beam_groups": (1, None),
            "no_repeat_ngram_size": (0, None), "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None),
            "top_h": (None,), "bos_token_id": (None,), "decoder_start_token_id": (None,),
            "length_penalty": (1.0, None), "early_stopping": (False, None), "synced_gpus": (False, None)}


@attrs.frozen
class GenerateParams:
    """Resolved generation parameters of one call (after defaults, model generation config, kwargs)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    sampler: Sampler = attrs.field(factory=Sampler)
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: int = 0
    num_return_sequences: int = 1


@functools.lru_cache(maxsize=1)
def hf_generation_keys() -> FrozenSet[str]:
    """Every attribute name of ``transformers.GenerationConfig`` (empty without ``transformers``); computed
    once per process (a constant of the installed transformers: building and copying a GenerationConfig cost
    about as much as a small model's whole prefill on every call).

    Example:
        >>> "num_beams" in hf_generation_keys() or not hf_generation_keys()
        True
    """
    try:
        from transformers import GenerationConfig
    except ImportError:  # pragma: no cover - transformers ships with every supported model
        return frozenset()
    return frozenset(GenerationConfig().to_dict()) | {"logits_processor", "stopping_criteria",
                                                       "prefix_allowed_tokens_fn", "synced_gpus",
                                                       "assistant_model", "negative_prompt_ids",
                                                       "negative_prompt_attention_mask", "use_model_defaults",
                                                       "custom_generate", "tokenizer", "assistant_tokenizer"}


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not (value.is_floating_point() or value.is_complex()
                                           or value.dtype == torch.bool)
    return False


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_arg(name: str, value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _token_ids(name: str, value: Any) -> Tuple[int, ...]:
    if value is None:
        return ()
    items = value.flatten().tolist() if isinstance(value, torch.Tensor) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"`{name}` must be an integer token id or a list of them, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _check_sampling(merged: Dict[str, Any]) -> None:
    """Hugging Face's warper checks (``TemperatureLogitsWarper`` etc.), raised as ``ValueError``."""
    t = merged.get("temperature")
    if t is not None and not (_is_real(t) and math.isfinite(float(t)) and float(t) > 0):
        raise ValueError(f"`temperature` (={t!r}) has to be a strictly positive float when sampling "
                         "(do_sample=True); for greedy decoding set `do_sample=False`")
    k = merged.get("top_k")
    if k is not None and not (_is_int(k) and int(k) >= 0):
        raise ValueError(f"`top_k` has to be a non-negative integer (0 disables it), but is {k!r}")
    p = merged.get("top_p")
    if p is not None and not (_is_real(p) and 0.0 <= float(p) <= 1.0):
        raise ValueError(f"`top_p` has to be a float in the [0, 1] interval, but is {p!r}")
    m = merged.get("min_p")
    if m is not None and not (_is_real(m) and 0.0 <= float(m) <= 1.0):
        raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {m!r}")


def _check_keys(kwargs: Dict[str, Any]) -> None:
    unknown, unsupported = [], []
    known = hf_generation_keys()
    for key, value in kwargs.items():
        if key in _OWN_KEYS:
            continue
        if key in _NEUTRAL and any(value is v or (not isinstance(value, torch.Tensor) and value == v)
                                   for v in _NEUTRAL[key]):
            continue
        if value is None and key in known:  # Hugging Face: a keyword given as None is unset (its default)
            continue
        (unsupported if (key in known or key in _NEUTRAL) else unknown).append((key, value))
    if unknown:
        raise ValueError(
            "The following `model_kwargs` are not used by the model: " + repr([k for k, _ in unknown])
            + " (note: typos in the generate arguments will also show up in this list)")
    if unsupported:
        raise UnsupportedError(
            "the decode engine's generate does not support "
            + ", ".join(f"{k}={v!r}" for k, v in unsupported) + "; supported: "
            + ", ".join(_OWN_KEYS + ("generator", "seed", "streamer", "attention_mask"))
            + ". For anything else call engine.module.generate(...) (Hugging Face's loop over the injected model)")


def resolve_params(prompt_len: int, kwargs: Dict[str, Any], model_generation_config: Any = None,
                   generation_config: Any = None, device: Any = "cpu", vocab_size: Optional[int] = None
                   ) -> GenerateParams:
    """Hugging Face layering: HF defaults < the model's generation config < ``generation_config`` < kwargs.

    Every value is validated (see the module docstring); ``vocab_size``, when given, bounds the EOS and pad
    token ids (``ValueError`` outside ``[0, vocab_size)``).

    Example:
        >>> resolve_params(3, {"max_new_tokens": 5, "do_sample": True, "top_k": 0}).sampler.top_k is None
        True
    """
    kwargs = dict(kwargs)
    generator = kwargs.pop("generator", None)
    seed = kwargs.pop("seed", None)
    _check_keys(kwargs)
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
    do_sample = merged.get("do_sample")
    if not isinstance(do_sample, bool):
        if isinstance(do_sample, numbers.Integral) and int(do_sample) in (0, 1):
            do_sample = bool(do_sample)
        else:
            raise TypeError(f"`do_sample` must be True or False, got {do_sample!r}")
    new = _max_new_tokens(prompt_len, merged, user, model_generation_config, generation_config)
    if merged.get("min_new_tokens") is not None:
        min_new = _int_arg("min_new_tokens", merged["min_new_tokens"])
    else:
        min_new = _int_arg("min_length", merged.get("min_length") or 0) - prompt_len
    min_new = max(min_new, 0)
    eos = _token_ids("eos_token_id", merged.get("eos_token_id"))
    pad_ids = _token_ids("pad_token_id", merged.get("pad_token_id"))
    if len(pad_ids) > 1:
        raise TypeError(f"`pad_token_id` must be one integer token id, got {merged.get('pad_token_id')!r}")
    pad = pad_ids[0] if pad_ids else (eos[0] if eos else 0)
    for name, ids in (("eos_token_id", eos), ("pad_token_id", (pad,) if pad_ids else ())):
        bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
        if bad:
            raise ValueError(f"`{name}` = {merged.get(name)!r} holds token ids outside the vocabulary "
                             f"[0, {vocab_size if vocab_size is not None else 'vocab_size'}): {bad}")
    penalty = merged.get("repetition_penalty")
    if penalty is not None and not (_is_real(penalty) and math.isfinite(float(penalty)) and float(penalty) > 0):
        raise ValueError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty!r}")
    n_ret = 1 if merged.get("num_return_sequences") is None else _int_arg("num_return_sequences",
                                                                           merged["num_return_sequences"])
    if n_ret < 1:
        raise ValueError(f"`num_return_sequences` must be at least 1, got {n_ret}")
    if n_ret > 1 and not do_sample:
        raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                         f"`num_return_sequences` different than 1 (got {n_ret}).")
    if do_sample:
        _check_sampling(merged)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(_int_arg("seed", seed))
    top_k, top_p, min_p = merged.get("top_k"), merged.get("top_p"), merged.get("min_p")
    sampler = Sampler(do_sample=do_sample,
                      temperature=float(merged["temperature"]) if do_sample and merged.get("temperature")
                      is not None else 1.0,
                      top_k=int(top_k) if do_sample and top_k else None,
                      top_p=float(top_p) if do_sample and top_p is not None else None,
                      min_p=float(min_p) if do_sample and min_p is not None else None,
                      repetition_penalty=float(penalty) if penalty is not None and float(penalty) != 1.0 else None,
                      generator=generator)
    return GenerateParams(max_new_tokens=new, min_new_tokens=min_new, sampler=sampler, eos_token_id=eos,
                          pad_token_id=int(pad), num_return_sequences=n_ret)


def _max_new_tokens(prompt_len: int, merged: Dict[str, Any], user: Dict[str, Any], *sources: Any) -> int:
    """Hugging Face's length rule: ``max_new_tokens`` wins; else ``max_length - prompt``; with neither given
    anywhere, 20 new tokens."""
    default_max_length = merged.get("max_length") == _HF_DEFAULTS["max_length"] and not any(
        _given(src, "max_length") for src in (*sources, user))
    if "max_new_tokens" in user or ("max_length" not in user and merged.get("max_new_tokens") is not None):
        new = _int_arg("max_new_tokens", merged["max_new_tokens"])
        if new <= 0:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {new}.")
        return new
    max_length = _int_arg("max_length", merged["max_length"])
    if default_max_length:  # Hugging Face: "by default let's always generate 20 new tokens"
        return max_length
    if max_length <= prompt_len:
        raise ValueError(f"Input length of input_ids is {prompt_len}, but `max_length` is set to {max_length}: "
                         "nothing to generate. Increase `max_length` or, better, set `max_new_tokens`.")
    return max_length - prompt_len


def _given(source: Any, key: str) -> bool:
    if source is None:
        return False
    value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
    return value is not None
