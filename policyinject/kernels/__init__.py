"""Triton kernels, one module per family, each with its plain-PyTorch reference.

- :mod:`policyinject.kernels.norms`: RMSNorm / LayerNorm, optionally fused with the residual add.
- :mod:`policyinject.kernels.rotary`: rotary embedding of q and k in one launch (half / interleaved, partial).
- :mod:`policyinject.kernels.activations`: SwiGLU / GeGLU from separate or fused gate/up.
- :mod:`policyinject.kernels.reference`: the PyTorch references of the three families above.
- :mod:`policyinject.kernels.gemv`: the 16-bit decode GEMV.
- :mod:`policyinject.kernels.quant_matmul`: int8/int4 weight-only matmuls (kernel choice in
  :mod:`~policyinject.kernels.quant_heuristics`); the weight format is in :mod:`~policyinject.kernels.quantize`.

Every public function takes ``backend="auto" | "triton" | "torch"`` (see ``docs/kernels.md``). Triton is
optional: only the private ``_*_triton`` modules import it, on the first Triton call, so every other module
imports without it and ``"auto"`` runs the PyTorch reference there. Nothing is imported here.
"""
