"""Calibrated weight quantization (GPTQ, AWQ-style scales) and quantized checkpoints.

* :mod:`.data_source` -- the calibration input (``quant.calibration``: text, token-id tensors, a callable);
* :mod:`.calibrate` -- layer-by-layer calibration driving GPTQ (:mod:`policyinject.kernels.quant_search`)
  and AWQ (:mod:`.awq`, :mod:`.awq_fold`);
* :mod:`.checkpoint` -- :func:`save_quantized` / ``quant.checkpoint``: calibrate once, load later;
* :mod:`.hook` -- the quantize pass's entry point.

Every method writes the stored format of :mod:`policyinject.kernels.quantize`, so every int4/int8 kernel serves
it unchanged. See docs/quantization.md.

Example:
    >>> from policyinject.quant import save_quantized, CALIBRATED_METHODS
    >>> CALIBRATED_METHODS
    ('gptq', 'awq')
"""

from .calibrate import CALIBRATED_METHODS, CalibrationResult, Target, calibrate
from .checkpoint import FORMAT_VERSION, read_checkpoint, save_quantized
from .data_source import DEFAULT_TEXT, CalibrationSpec, calibration_rows

__all__ = ["CALIBRATED_METHODS", "CalibrationResult", "Target", "calibrate", "FORMAT_VERSION", "read_checkpoint",
           "save_quantized", "DEFAULT_TEXT", "CalibrationSpec", "calibration_rows"]
