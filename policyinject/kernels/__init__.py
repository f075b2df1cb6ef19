"""Triton kernels, one module per family, each with its plain-PyTorch reference.

- :mod:`policyinject.kernels.norms`: RMSNorm / LayerNorm, optionally fused with the residual add.
- :mod:`policyinject.kernels.rotary`: rotary embedding of q and k in one launch (half / interleaved, partial).
- :mod:`policyinject.kernels.activations`: SwiGLU / GeGLU from separate or fused gate/up.
- :mod:`policyinject.kernels.reference`: the PyTorch references of the three families above.
- ``gemv`` / ``quant*`` modules: decode GEMV and quantization kernels.

Every public function takes ``backend="auto" | "triton" | "torch"`` (see ``docs/kernels.md``). Nothing is
imported here, so ``import policyinject.kernels`` never needs triton.
"""
