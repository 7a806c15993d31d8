"""Quantized linear layers (emulated NVFP4 and FP8) and the factory that builds every linear
layer of the model.

The modules use Transformer Engine's parameter names (`te.Linear`, `te.LayerNormLinear`,
`te.LayerNormMLP`), so a checkpoint loads on either backend.

GEMMs per TE's recipe table (NVFP4BlockScaling; Q = quantize, blocks of 16 along the last dim):
    fprop  Y  = Q(X)                  @ Q(W, 16x16 tiles)^T
    dgrad  dX = Q(dY, SR)             @ Q(W)            (the same 2D-quantized weight values)
    wgrad  dW = Q(RHT(dY^T), SR)      @ Q(RHT(X^T))^T   (blocks along the token dim)
Each GEMM multiplies exact operand values with fp32 accumulation, then applies TE's epilogue
alpha = amax_a * amax_b / (6 * 6 * 448 * 448) (FP8: scale_inv_a * scale_inv_b) and the bias.
"""
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .formats import (NVFP4_ALPHA_DENOM, FP8Recipe, NVFP4Recipe, NVFP4Tensor, quantize_fp8,
                      quantize_nvfp4, random_bits, random_hadamard_transform)
from .shapes import gemm_shape_error, rows_of

try:  # the fused GPU kernel; PyTorch's reference implementation runs everywhere else
    from . import kernels
except ImportError:
    kernels = None

Recipe = Union[NVFP4Recipe, FP8Recipe]
_active_stats = None  # an FP4Stats while `collect_fp4_stats` is active (eager passes only)


def _quantize(recipe: Recipe, kind: str, t: torch.Tensor, name: str, rowwise: bool = True,
              columnwise: bool = False):
    """Quantize the GEMM operand t (kind: x, w or dy) into its rowwise copy (fprop, dgrad) and/or
    its columnwise copy: Q(t^T) (x, dy: Q(RHT(t^T))) in t^T's shape, the transposed operand of
    the wgrad GEMM (of dgrad for W). Returns (rowwise, columnwise), each (values, factor) or None."""
    if isinstance(recipe, FP8Recipe):  # per-tensor scaling: the transpose has the same values
        q = quantize_fp8(t, torch.float8_e5m2 if kind == "dy" else torch.float8_e4m3fn)
        values = q.values.to(_gemm_dtype(t))
        return (values, q.scale_inv) if rowwise else None, (values.t(), q.scale_inv) if columnwise else None
    tile_rows = 16 if kind == "w" and not recipe.disable_2d_quantization else 1
    reuse = columnwise and tile_rows == 16  # 16x16 tiles quantize W and W^T to the same values
    columnwise = columnwise and not reuse
    rht = kind != "w" and not recipe.disable_rht  # of the columnwise copy
    stochastic = kind == "dy" and not recipe.disable_stochastic_rounding
    if _kernel_takes(t, rowwise, columnwise, tile_rows):  # both copies from one read of t
        t = t.contiguous()
        seed = (torch.randint(2 ** 62, (1,), device=t.device) if stochastic
                else torch.empty(0, dtype=torch.int64, device=t.device))
        row, col, amax = torch.ops.nvfp4.quantize(t, seed, tile_rows, rowwise, columnwise, rht, stochastic)
        row, col = (row, amax[0]) if rowwise else None, (col.t(), amax[1]) if columnwise else None
    else:
        row = col = None
        if rowwise:
            q = quantize_nvfp4(t, tile_rows=tile_rows, stochastic=stochastic,
                               bits=random_bits(t.shape, t.device) if stochastic else None)
            if _active_stats is not None:
                _active_stats.record(name, kind, t, q)
            row = (q.values().to(_gemm_dtype(t)), q.amax)
        if columnwise:
            tt = t.t().contiguous()
            tt = random_hadamard_transform(tt) if rht else tt
            q = quantize_nvfp4(tt, stochastic=stochastic, bits=random_bits(tt.shape, t.device) if stochastic else None)
            col = (q.values().to(_gemm_dtype(t)), q.amax)
    return row, (row[0].t(), row[1]) if reuse else col


def _kernel_takes(t: torch.Tensor, rowwise: bool, columnwise: bool, tile_rows: int) -> bool:
    """The Triton kernels quantize CUDA operands whose blocks tile them exactly (all of them in
    training, per the shape guards); --fp4-stats passes take the reference to see codes and scales."""
    if kernels is None or not t.is_cuda or _active_stats is not None:
        return False
    rows, cols = t.shape
    return ((not rowwise or (cols % 16 == 0 and rows % tile_rows == 0))
            and (not columnwise or rows % 16 == 0))


def _gemm_dtype(t: torch.Tensor) -> torch.dtype:
    # Operand values are exact in bf16; CUDA multiplies bf16 with fp32 accumulation, CPU in fp32.
    return torch.bfloat16 if t.is_cuda else torch.float32


def _alpha(recipe: Recipe, factor_a: torch.Tensor, factor_b: torch.Tensor) -> torch.Tensor:
    if isinstance(recipe, FP8Recipe):
        return factor_a * factor_b
    return factor_a * factor_b / NVFP4_ALPHA_DENOM


def _gemm(recipe: Recipe, a, a_factor, b_t, b_factor, bias, out_dtype, wgrad=False):
    """alpha * (a @ b_t) + bias with fp32 accumulation, rounded once to out_dtype. On CUDA,
    fprop and dgrad run the Triton GEMM with this epilogue fused (the fp32 product never goes
    to memory); wgrad (K = tokens, a small output) stays with cuBLAS, whose split-K suits it."""
    if kernels is not None and a.is_cuda and not wgrad:
        alpha_scale = kernels.NVFP4_ALPHA_SCALE if isinstance(recipe, NVFP4Recipe) else 1.0
        return torch.ops.nvfp4.scaled_mm(a, b_t, a_factor, b_factor, bias, alpha_scale, out_dtype)
    acc = torch.mm(a, b_t, out_dtype=torch.float32) if a.is_cuda else torch.mm(a, b_t)
    y = acc * _alpha(recipe, a_factor, b_factor)
    if bias is not None:
        y = y + bias.to(out_dtype)  # TE's epilogue adds the bias in the output dtype
    # no `.to()` when the dtype already matches: torch 2.11's compiled autograd.Function
    # returns zero gradients for a forward output that aliases an intermediate
    return y if y.dtype == out_dtype else y.to(out_dtype)


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe, name, need_dx, need_dw):
        # need_dx/need_dw come from the caller: ctx.needs_input_grad is not reliable under
        # torch.compile in every torch release (2.11 traced a backward that skipped dX).
        (xq, x_factor), xt = _quantize(recipe, "x", x, name, columnwise=need_dw)
        (wq, w_factor), wt = _quantize(recipe, "w", weight, name, columnwise=need_dx)
        y = _gemm(recipe, xq, x_factor, wq.t(), w_factor, bias, x.dtype)
        xtq, xt_factor = xt or (None, None)
        wtq, wt_factor = wt or (None, None)
        ctx.save_for_backward(xtq, xt_factor, wtq, wt_factor)
        ctx.recipe, ctx.name, ctx.need_dx, ctx.need_dw = recipe, name, need_dx, need_dw
        ctx.need_db = bias is not None and bias.requires_grad
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, xt_factor, wtq, wt_factor = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        dy_row, dy_col = _quantize(ctx.recipe, "dy", dy, ctx.name, rowwise=ctx.need_dx, columnwise=ctx.need_dw)
        if ctx.need_dx:
            dyq, dy_factor = dy_row
            dx = _gemm(ctx.recipe, dyq, dy_factor, wtq.t(), wt_factor, None, ctx.x_dtype)
        if ctx.need_dw:
            dytq, dyt_factor = dy_col
            dw = _gemm(ctx.recipe, dytq, dyt_factor, xtq.t(), xt_factor, None, torch.float32, wgrad=True)
            dw = dw.to(ctx.w_dtype)
        if ctx.need_db:
            db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # from the unquantized dY, as TE
        return dx, dw, db, None, None, None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     recipe: Optional[Recipe] = None, name: str = "linear") -> torch.Tensor:
    """F.linear with its three GEMMs in `recipe`'s format (plain F.linear when recipe is None).
    Under autocast the input is cast to the autocast dtype, as F.linear would be; the weight
    is quantized from its own (master) dtype, as TE does."""
    if recipe is None:
        return F.linear(x, weight, bias)
    if not x.is_floating_point():
        raise TypeError(f"{name}: quantized linear needs a floating-point input, got {x.dtype}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    x2d = rows_of(x)
    need_dx = torch.is_grad_enabled() and x.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    training = need_dx or need_dw
    # The token dim M only carries blocks in the wgrad GEMM: inference takes any M.
    error = gemm_shape_error(recipe, x2d.shape[0] if training else 0, *weight.shape[::-1])
    if error:
        raise ValueError(f"layer {name}: {error}")
    # The name is read only where it is used (errors, --fp4-stats): torch.compile guards on every
    # constant it reads, and a name per layer would compile each block of a model on its own.
    stats_name = name if _active_stats is not None else None
    with torch.autocast(device_type, enabled=False):
        y = _QuantizedLinearFn.apply(x2d, weight, bias, recipe, stats_name, need_dx, need_dw)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- Modules with Transformer Engine's parameter names ------------------------------------------

class Linear(nn.Module):
    """nn.Linear with `te.Linear`'s names (weight, bias); quantized when given a recipe."""

    def __init__(self, in_features: int, out_features: int, recipe: Optional[Recipe] = None,
                 name: str = "linear"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.xavier_uniform_(self.weight)
        self.recipe, self.name = recipe, name

    def forward(self, x):
        return quantized_linear(x, self.weight, self.bias, self.recipe, self.name)

    def extra_repr(self):
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, recipe={self.recipe}"


class LayerNormLinear(nn.Module):
    """LayerNorm then Linear, as `te.LayerNormLinear` (layer_norm_weight/bias, weight, bias)."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6,
                 recipe: Optional[Recipe] = None, name: str = "norm_linear"):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.xavier_uniform_(self.weight)
        self.eps, self.recipe, self.name = eps, recipe, name

    def forward(self, x):
        h = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return quantized_linear(h, self.weight, self.bias, self.recipe, self.name)


class LayerNormMLP(nn.Module):
    """LayerNorm, fc1, GELU, fc2, as `te.LayerNormMLP` (whose 'gelu' is the tanh form)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, eps: float = 1e-6,
                 recipe: Optional[Recipe] = None, name: str = "mlp"):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.layer_norm_bias = nn.Parameter(torch.zeros(hidden_size))
        self.fc1_weight = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size))
        self.fc1_bias = nn.Parameter(torch.zeros(ffn_hidden_size))
        self.fc2_weight = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        self.fc2_bias = nn.Parameter(torch.zeros(hidden_size))
        nn.init.xavier_uniform_(self.fc1_weight)
        nn.init.xavier_uniform_(self.fc2_weight)
        self.eps, self.recipe, self.fc1_name, self.fc2_name = eps, recipe, name + ".fc1", name + ".fc2"

    def forward(self, x):
        h = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        h = quantized_linear(h, self.fc1_weight, self.fc1_bias, self.recipe, self.fc1_name)
        h = F.gelu(h, approximate="tanh")
        return quantized_linear(h, self.fc2_weight, self.fc2_bias, self.recipe, self.fc2_name)


class LayerFactory:
    """Builds every linear layer of the model, so that backends swap without model changes.

    A layer runs in `recipe`'s format unless its name matches one of `keep_high_precision`
    (fnmatch patterns). backend="te" builds Transformer Engine modules for the quantized
    layers (all layers when recipe is None); kept layers stay PyTorch modules, which TE's
    autocast does not touch. `gemms` records (name, in, out, quantized) of every GEMM built,
    `names` the layers' names, `matched` the patterns that matched one.
    """

    def __init__(self, recipe: Optional[Recipe] = None, keep_high_precision=(),
                 backend: str = "torch", eps: float = 1e-6):
        self.recipe, self.keep, self.backend, self.eps = recipe, tuple(keep_high_precision), backend, eps
        self.gemms, self.names, self.matched = [], [], set()

    def _recipe_for(self, name: str) -> Optional[Recipe]:
        self.names.append(name)
        kept = {pattern for pattern in self.keep if fnmatch(name, pattern)}
        self.matched |= kept
        return None if self.recipe is None or kept else self.recipe

    def _use_te(self, recipe) -> bool:
        return self.backend == "te" and (recipe is not None or self.recipe is None)

    def linear(self, name: str, in_features: int, out_features: int) -> nn.Module:
        recipe = self._recipe_for(name)
        self.gemms.append((name, in_features, out_features, recipe is not None))
        if self._use_te(recipe):
            from . import te_backend
            return te_backend.make_module("linear", in_features, out_features, self.eps)
        return Linear(in_features, out_features, recipe, name)

    def norm_linear(self, name: str, in_features: int, out_features: int) -> nn.Module:
        recipe = self._recipe_for(name)
        self.gemms.append((name, in_features, out_features, recipe is not None))
        if self._use_te(recipe):
            from . import te_backend
            return te_backend.make_module("norm_linear", in_features, out_features, self.eps)
        return LayerNormLinear(in_features, out_features, self.eps, recipe, name)

    def norm_mlp(self, name: str, hidden_size: int, ffn_hidden_size: int) -> nn.Module:
        recipe = self._recipe_for(name)
        self.gemms.append((name + ".fc1", hidden_size, ffn_hidden_size, recipe is not None))
        self.gemms.append((name + ".fc2", ffn_hidden_size, hidden_size, recipe is not None))
        if self._use_te(recipe):
            from . import te_backend
            return te_backend.make_module("norm_mlp", hidden_size, ffn_hidden_size, self.eps)
        return LayerNormMLP(hidden_size, ffn_hidden_size, self.eps, recipe, name)


# ---- FP4 diagnostics ------------------------------------------------------------------------

class FP4Stats:
    """Per quantized layer and operand (X, W, dY): fraction of nonzero values flushed to zero,
    fraction at the block max (|code| = 6), E4M3 scale range used, relative error."""
    OPERAND = {"x": "X", "w": "W", "dy": "dY"}

    def __init__(self):
        self.rows = {}

    @torch.no_grad()
    def record(self, layer: str, kind: str, x: torch.Tensor, q: NVFP4Tensor) -> None:
        x = x.to(torch.float32)
        nonzero = x != 0
        used = q.scales[q.scales > 0]
        error = torch.linalg.vector_norm(q.dequantize() - x) / torch.linalg.vector_norm(x).clamp_min(1e-30)
        self.rows[f"{layer}.{self.OPERAND[kind]}"] = {
            "flushed_to_zero": ((q.codes == 0) & nonzero).sum().item() / max(nonzero.sum().item(), 1),
            "at_block_max": (q.codes.abs() == 6).sum().item() / max(x.numel(), 1),
            "scale_min": used.min().item() if used.numel() else 0.0,
            "scale_max": used.max().item() if used.numel() else 0.0,
            "rel_error": error.item(),
        }


@contextmanager
def collect_fp4_stats():
    """Record FP4Stats of every emulated NVFP4 GEMM operand run inside the block (eager only)."""
    global _active_stats
    stats, previous = FP4Stats(), _active_stats
    _active_stats = stats
    try:
        yield stats
    finally:
        _active_stats = previous
