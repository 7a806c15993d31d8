"""NVFP4 (and FP8) training numerics as Transformer Engine defines them, emulated in PyTorch.

    formats     E2M1 / E4M3 rules, RHT, quantize_nvfp4, fake_quantize, quantize_fp8
    linear      quantized linear autograd function, TE-named modules, the layer factory
    te_backend  Transformer Engine modules, recipes and capability rules
    guards      contiguity, GEMM shape, mask and loss guards
"""
from .formats import FP8Recipe, NVFP4Recipe, fake_quantize, quantize_fp8, quantize_nvfp4
from .guards import LossGuard, NonFiniteLossError, check_mask
from .linear import LayerFactory, collect_fp4_stats, quantized_linear

__all__ = ["FP8Recipe", "NVFP4Recipe", "fake_quantize", "quantize_fp8", "quantize_nvfp4",
           "LossGuard", "NonFiniteLossError", "check_mask", "LayerFactory", "collect_fp4_stats",
           "quantized_linear"]
