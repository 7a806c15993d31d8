"""NVFP4 (and FP8) training numerics as Transformer Engine defines them, emulated in PyTorch.

    formats     E2M1 / E4M3 rules, RHT, quantize_nvfp4, fake_quantize, quantize_fp8, the recipes
    kernels     Triton kernels of the quantizer and the scaled GEMM (GPUs)
    linear      quantized linear autograd function, TE-named modules, the layer factory, FP4 stats
    shapes      TE's GEMM shape rules
    te_backend  Transformer Engine's modules, recipes, autocast and capability rules
    precision   Precision: a run's format, backend and autocast, resolved once for a device
"""
from .formats import (FOUR_OVER_SIX_ERR_MODES, SCOPES, FP8Recipe, NativeFP8Recipe, NVFP4Recipe, fake_quantize,
                      quantize_fp8, quantize_nvfp4, recipe_environment)
from .linear import LayerFactory, collect_fp4_stats, count_saved_bytes, quantized_linear
from .precision import PRECISIONS, Precision, compact_names
from .shapes import gemm_shape_error
from .te_backend import BackendError

__all__ = ["FOUR_OVER_SIX_ERR_MODES", "SCOPES", "FP8Recipe", "NativeFP8Recipe", "NVFP4Recipe", "fake_quantize",
           "quantize_fp8", "quantize_nvfp4", "recipe_environment", "LayerFactory", "collect_fp4_stats",
           "count_saved_bytes", "quantized_linear", "PRECISIONS", "Precision", "compact_names", "gemm_shape_error",
           "BackendError"]
