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
The recipe's other switches (NVFP4Recipe.quantizer) change how each operand is quantized:
4over6 blocks and a 256 bound in place of 448 (forward operands), one amax per row (the input's
copies: alpha then has one factor per output row in fprop, per output column in wgrad);
backward_override replaces the quantized dgrad/wgrad by unquantized GEMMs.

Each quantized copy is made in the form its consumer needs. A copy a GEMM multiplies at once
(fprop's X and W, dgrad's and wgrad's dY) is written as its exact GEMM values (Operand: code x
E4M3 scale, exact in bf16), which the GEMM reads as they are. A copy kept for backward (the
columnwise X and W) is held as TE holds it (PackedOperand: uint8 data, two E2M1 codes a byte,
E4M3 block scales, fp32 amax; 0.5625 bytes an element) and expanded to its values once, just
before its GEMM (PackedOperand.operand). On CUDA the Triton quantize kernel writes both forms
from one read of the operand (elsewhere PyTorch computes them); GEMMs multiply the values on
bf16 tensor cores: a GEMM that expanded TE's bytes in its registers was ALU-bound on Hopper and
slower (docs/RESULTS.md).
"""
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .formats import (PACKED, VALUES, FP8Recipe, NVFP4Quantizer, NVFP4Recipe, NVFP4Tensor, alpha_denom, quantize_fp8,
                      quantize_nvfp4, random_bits, random_hadamard_transform, unpack_e2m1)
from .shapes import gemm_shape_error, rows_of

try:  # the fused GPU kernel; PyTorch's reference implementation runs everywhere else
    from . import kernels
except ImportError:
    kernels = None

Recipe = Union[NVFP4Recipe, FP8Recipe]
_active_stats = None  # an FP4Stats while `collect_fp4_stats` is active (eager passes only)
_saved_bytes = None  # {"x": bytes, "w": bytes} while `count_saved_bytes` is active (eager passes only)


@contextmanager
def count_saved_bytes():
    """Count the bytes that the linear layers' forward passes inside save for their backward, by
    operand: x (the input's copy: quantized, dequantized or as it came) and w (the weight's).
    Eager passes only: the counting is Python code of the layers."""
    global _saved_bytes
    _saved_bytes = counts = {"x": 0, "w": 0}
    try:
        yield counts
    finally:
        _saved_bytes = None


def _count_saved(x_bytes: int, w_bytes: int):
    if _saved_bytes is not None:
        _saved_bytes["x"] += x_bytes
        _saved_bytes["w"] += w_bytes


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Operand(NamedTuple):
    """A quantized GEMM operand: exact values (code x E4M3 block scale, or the FP8 value), its
    fp32 global factor (NVFP4: the amax, a scalar or one per row; FP8: scale_inv), and NVFP4's
    E4M3 bound of the global scale (None for FP8), which TE's GEMM alpha divides by."""
    values: torch.Tensor
    factor: torch.Tensor
    e4m3_max: Optional[int] = None

    def t(self) -> "Operand":
        return self._replace(values=self.values.t())


class PackedOperand(NamedTuple):
    """An NVFP4 GEMM operand as TE stores it (NVFP4Tensor.packed: uint8 data [rows, cols / 2], two
    E2M1 codes a byte, and float8_e4m3fn block scales [rows, cols / 16], blocks along the stored
    rows) with its amax (a scalar, or one per stored row) and E4M3 bound. `transposed`: the
    operand is the transpose of the stored matrix (a weight in fprop; a 16x16-tile weight's
    columnwise copy, which is its rowwise one)."""
    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    e4m3_max: int
    cols: int
    transposed: bool = False

    @classmethod
    def of(cls, q: NVFP4Tensor) -> "PackedOperand":
        return cls(*q.packed(), q.amax, q.e4m3_max, q.codes.shape[1])

    def t(self) -> "PackedOperand":
        return self._replace(transposed=not self.transposed)

    def operand(self) -> Operand:
        """The exact GEMM operand (code x scale, in the GEMM dtype) of the stored bytes: a
        temporary, freed after its GEMM (CUDA: one Triton kernel, nvfp4::unpack)."""
        if kernels is not None and self.data.is_cuda:
            values = torch.ops.nvfp4.unpack(self.data, self.scale)
        else:
            q = NVFP4Tensor(unpack_e2m1(self.data, self.cols), self.scale.to(torch.float32), self.amax, self.e4m3_max)
            values = q.values().to(_gemm_dtype(self.data))
        return Operand(values.t() if self.transposed else values, self.amax, self.e4m3_max)


def _values(copy) -> Optional[Operand]:
    """A copy as its GEMM operand: a PackedOperand expanded, an Operand (or None) as it is."""
    return copy.operand() if isinstance(copy, PackedOperand) else copy


def _quantize(recipe: Recipe, kind: str, t: torch.Tensor, name: str, row: Optional[int] = VALUES,
              col: Optional[int] = None, dequantized: bool = False):
    """Quantize the GEMM operand t (kind: x, w or dy) into its rowwise copy (fprop, dgrad) and/or
    its columnwise copy: Q(t^T) (x, dy: Q(RHT(t^T))) in t^T's shape, the transposed operand of
    the wgrad GEMM (of dgrad for W). row / col: the form each copy is wanted in (None: not at
    all): VALUES, the exact GEMM operand (Operand), or PACKED, TE's bytes (PackedOperand; FP8:
    its 1-byte values, an Operand). Returns (row, col, dequantized): with `dequantized` also the
    rowwise copy as TE's dequantize gives it, in t's dtype."""
    if isinstance(recipe, FP8Recipe):
        return _quantize_fp8(recipe, kind, t, row is not None, col is not None, dequantized)
    spec = recipe.quantizer(kind)
    # 16x16 tiles quantize W and W^T to the same values, unless 4over6 adds a tile's errors in
    # another order for the transpose: the columnwise copy is the rowwise one, transposed
    reuse = col is not None and spec.tile_rows == 16 and spec.four_over_six is None
    row_forms = {row, col if reuse else None} - {None}
    col_forms = set() if reuse or col is None else {col}
    if _kernel_takes(t, bool(row_forms), bool(col_forms), spec.tile_rows):
        copies, deq = _quantize_on_gpu(spec, t.contiguous(), row_forms, col_forms, dequantized)
    else:
        copies, deq = _quantize_in_torch(spec, kind, t, name, row_forms, col_forms, dequantized)
    row_copy = copies.get(("row", row))
    col_copy = copies.get(("row", col)).t() if reuse else copies.get(("col", col))
    return row_copy, col_copy, deq


def _quantize_fp8(recipe: FP8Recipe, kind: str, t: torch.Tensor, rowwise: bool, columnwise: bool,
                  dequantized: bool):
    """TE's per-tensor current scaling (E4M3; E5M2 for dY): the columnwise copy has the rowwise
    one's values, transposed. On CUDA one Triton kernel writes both from one read (the transpose
    contiguous, as Hopper's FP8 GEMM takes its operands K-major); native FP8 keeps the 1-byte
    values, the emulation bf16 ones."""
    fp8 = torch.float8_e5m2 if kind == "dy" else torch.float8_e4m3fn
    exact = fp8 if recipe.native else _gemm_dtype(t)
    if kernels is not None and t.is_cuda and t.dim() == 2 and not dequantized:
        values, values_t, scale_inv = torch.ops.nvfp4.quantize_fp8(t.contiguous(), kernels.FP8_CODES[fp8],
                                                                  rowwise, columnwise)
        return (Operand(values.to(exact), scale_inv) if rowwise else None,
                Operand(values_t.to(exact), scale_inv) if columnwise else None, None)
    q = quantize_fp8(t, fp8)
    values = q.values.to(exact)
    return (Operand(values, q.scale_inv) if rowwise else None,
            Operand(values.t(), q.scale_inv) if columnwise else None,
            (q.values * q.scale_inv).to(t.dtype) if dequantized else None)


def _quantize_in_torch(spec: NVFP4Quantizer, kind: str, t: torch.Tensor, name: str, row_forms: set,
                       col_forms: set, dequantized: bool):
    """The reference path (CPUs; --fp4-stats passes): formats.quantize_nvfp4 per copy."""
    copies, deq = {}, None
    if row_forms:
        q = _quantize_2d(spec, t)
        if _active_stats is not None:
            _active_stats.record(name, kind, t, q)
        copies.update(_forms_of(q, "row", row_forms))
        deq = q.dequantize().to(t.dtype) if dequantized else None
    if col_forms:
        tt = t.t().contiguous()
        q = _quantize_2d(spec, random_hadamard_transform(tt) if spec.rht else tt)
        copies.update(_forms_of(q, "col", col_forms))
    return copies, deq


def _forms_of(q: NVFP4Tensor, copy: str, forms: set) -> dict:
    """{(copy, form): the copy q in each asked form}."""
    out = {}
    if VALUES in forms:
        out[(copy, VALUES)] = Operand(q.values().to(_gemm_dtype(q.codes)), q.amax, q.e4m3_max)
    if PACKED in forms:
        out[(copy, PACKED)] = PackedOperand.of(q)
    return out


def _quantize_2d(spec: NVFP4Quantizer, t: torch.Tensor):
    return quantize_nvfp4(t, tile_rows=spec.tile_rows, stochastic=spec.stochastic,
                          bits=random_bits(t.shape, t.device) if spec.stochastic else None,
                          four_over_six=spec.four_over_six, e4m3_max=spec.e4m3_max, row_scaled=spec.row_scaled)


def _quantize_on_gpu(spec: NVFP4Quantizer, t: torch.Tensor, row_forms: set, col_forms: set, dequantized: bool):
    """The Triton op: both copies, each in its forms, from one read of t. A 16x16-tile columnwise
    copy (4over6 weights) is the rowwise copy of t^T, quantized on its own."""
    if col_forms and spec.tile_rows == 16:
        copies, deq = _quantize_on_gpu(spec, t, row_forms, set(), dequantized) if row_forms else ({}, None)
        col, _ = _quantize_on_gpu(spec, t.t().contiguous(), col_forms, set(), False)
        return {**copies, **{("col", form): copy for (_, form), copy in col.items()}}, deq
    seed = (torch.randint(2 ** 62, (1,), device=t.device) if spec.stochastic
            else torch.empty(0, dtype=torch.int64, device=t.device))
    mode = kernels.FOUR_OVER_SIX_MODES[spec.four_over_six]
    row_values, row_data, row_scale, col_values, col_data, col_scale, amax, deq = torch.ops.nvfp4.quantize(
        t, seed, spec.tile_rows, sum(row_forms), sum(col_forms),  # bit sets of the forms
        spec.rht, spec.stochastic, mode, spec.e4m3_max, spec.row_scaled, dequantized)
    rows, cols = t.shape
    row_amax, col_amax = (amax[:rows], amax[rows:]) if spec.row_scaled else (amax[0], amax[1])
    copies = {("row", VALUES): Operand(row_values, row_amax, spec.e4m3_max),
              ("row", PACKED): PackedOperand(row_data, row_scale, row_amax, spec.e4m3_max, cols),
              ("col", VALUES): Operand(col_values.t(), col_amax, spec.e4m3_max),  # written in t's layout
              ("col", PACKED): PackedOperand(col_data, col_scale, col_amax, spec.e4m3_max, rows)}
    asked = {("row", f) for f in row_forms} | {("col", f) for f in col_forms}
    return {key: copy for key, copy in copies.items() if key in asked}, deq if dequantized else None


def _kernel_takes(t: torch.Tensor, rowwise: bool, columnwise: bool, tile_rows: int) -> bool:
    """The Triton kernels quantize CUDA operands whose blocks tile them exactly (all of them in
    training, per the shape guards); --fp4-stats passes take the reference to see codes and scales."""
    if kernels is None or not t.is_cuda or _active_stats is not None:
        return False
    rows, cols = t.shape
    return ((not rowwise or (cols % 16 == 0 and rows % tile_rows == 0))
            and (not columnwise or (rows % 16 == 0 and cols % tile_rows == 0)))


def _gemm_dtype(t: torch.Tensor) -> torch.dtype:
    # Operand values are exact in bf16; CUDA multiplies bf16 with fp32 accumulation, CPU in fp32.
    return torch.bfloat16 if t.is_cuda else torch.float32


def _gemm(a: Operand, b_t: Operand, bias, out_dtype, wgrad=False):
    """alpha * (a @ b_t) + bias with fp32 accumulation, rounded once to out_dtype, where alpha =
    a.factor * b_t.factor (FP8) or a.factor * b_t.factor / (6 * 6 * a.e4m3_max * b.e4m3_max) (NVFP4;
    a factor per row of a, or per column of b_t, where row-scaled). On CUDA, fprop and dgrad run
    the Triton GEMM with this epilogue fused (the fp32 product never goes to memory); wgrad (K =
    tokens, a small output) stays with cuBLAS, whose split-K suits it."""
    nvfp4 = a.e4m3_max is not None
    if a.values.dtype in FP8_DTYPES:
        return _fp8_mm(a, b_t, bias, out_dtype)
    if kernels is not None and a.values.is_cuda and not wgrad:
        alpha_scale = kernels.nvfp4_alpha_scale(a.e4m3_max, b_t.e4m3_max) if nvfp4 else 1.0
        return torch.ops.nvfp4.scaled_mm(a.values, b_t.values, a.factor, b_t.factor, bias, alpha_scale, out_dtype)
    acc = (torch.mm(a.values, b_t.values, out_dtype=torch.float32) if a.values.is_cuda
           else torch.mm(a.values, b_t.values))
    alpha = (a.factor[:, None] if a.factor.dim() else a.factor) * (b_t.factor[None, :] if b_t.factor.dim() else b_t.factor)
    y = acc * (alpha / alpha_denom(a.e4m3_max, b_t.e4m3_max) if nvfp4 else alpha)
    if bias is not None:
        y = y + bias.to(out_dtype)  # TE's epilogue adds the bias in the output dtype
    # no `.to()` when the dtype already matches: torch 2.11's compiled autograd.Function
    # returns zero gradients for a forward output that aliases an intermediate
    return y if y.dtype == out_dtype else y.to(out_dtype)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fp8_mm(a: Operand, b_t: Operand, bias, out_dtype):
    """NativeFP8Recipe's GEMM: torch._scaled_mm(a, b_t) * a.factor * b_t.factor (+ bias), fp32
    accumulation and one rounding to out_dtype. cuBLAS takes a row-major and b_t column-major
    (a transposed copy of the 1-byte values where the operand is the other way round) and
    dimensions that are multiples of 16; other shapes multiply the same values as the emulation
    does."""
    (m, k), n = a.values.shape, b_t.values.shape[1]
    if m % 16 or k % 16 or n % 16:
        exact = _gemm_dtype(a.values)
        return _gemm(Operand(a.values.to(exact), a.factor), Operand(b_t.values.to(exact), b_t.factor), bias,
                     out_dtype)
    # cuBLAS adds a bias in its epilogue only for 16-bit outputs; an fp32 output adds it after,
    # in fp32, where the emulation adds it too
    fused = bias is not None and out_dtype != torch.float32
    # the layers' copies come in these layouts (_quantize_fp8), so neither call copies there
    y = torch._scaled_mm(a.values.contiguous(), b_t.values.t().contiguous().t(), a.factor, b_t.factor,
                         bias=bias.to(out_dtype) if fused else None, out_dtype=out_dtype)
    return y + bias.to(out_dtype) if bias is not None and not fused else y


def _high_precision_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in a's dtype (fp32 accumulation), as the unquantized backward GEMMs of TE's
    backward_override run."""
    return torch.mm(a, b.to(a.dtype))


class _QuantizedLinearFn(torch.autograd.Function):
    """y = x @ W^T + b with the three GEMMs in the recipe's format. recipe.backward_override
    (TE's): None quantizes dY and runs dgrad/wgrad on the columnwise copies; "high_precision"
    saves x and W and runs both GEMMs unquantized; "dequantized" saves the forward's rowwise
    copies dequantized (TE's dequantize) and runs both unquantized on them."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, name, need_dx, need_dw):
        # need_dx/need_dw come from the caller: ctx.needs_input_grad is not reliable under
        # torch.compile in every torch release (2.11 traced a backward that skipped dX).
        override = recipe.backward_override
        quantized_backward = override is None
        dequantized = override == "dequantized"
        xq, xt, x_deq = _quantize(recipe, "x", x, name, col=PACKED if need_dw and quantized_backward else None,
                                  dequantized=need_dw and dequantized)
        wq, wt, w_deq = _quantize(recipe, "w", weight, name, col=PACKED if need_dx and quantized_backward else None,
                                  dequantized=need_dx and dequantized)
        # TE (module/linear.py): a quantized GEMM takes no fp32 bias, so with fp32 activations the
        # bias is cast to bf16 first
        gemm_bias = bias.to(torch.bfloat16) if bias is not None and x.dtype == torch.float32 else bias
        y = _gemm(xq, wq.t(), gemm_bias, x.dtype)
        if quantized_backward:
            (saved_x, x_layout), (saved_w, w_layout) = _kept(xt), _kept(wt)
            ctx.layouts = (x_layout, w_layout, len(saved_x))
        elif dequantized:
            saved_x, saved_w = (x_deq,), (w_deq,)
        else:
            saved_x, saved_w = (x if need_dw else None,), (weight if need_dx else None,)
        ctx.save_for_backward(*saved_x, *saved_w)
        _count_saved(_nbytes(saved_x), _nbytes(saved_w))
        ctx.recipe, ctx.name, ctx.need_dx, ctx.need_dw = recipe, name, need_dx, need_dw
        ctx.need_db = bias is not None and bias.requires_grad
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.recipe.backward_override is None:
            x_layout, w_layout, x_count = ctx.layouts
            xt = _restored(ctx.saved_tensors[:x_count], x_layout)
            wt = _restored(ctx.saved_tensors[x_count:], w_layout)
            dy_row, dy_col, _ = _quantize(ctx.recipe, "dy", dy, ctx.name, row=VALUES if ctx.need_dx else None,
                                          col=VALUES if ctx.need_dw else None)
            if ctx.need_dx:
                dx = _gemm(dy_row, _values(wt).t(), None, ctx.x_dtype)
            if ctx.need_dw:  # TE's wgrad GEMM writes the activation dtype
                dw = _gemm(dy_col, _values(xt).t(), None, ctx.x_dtype, wgrad=True)
        else:
            x_saved, w_saved = ctx.saved_tensors
            if ctx.need_dx:
                dx = _high_precision_mm(dy, w_saved)
            if ctx.need_dw:
                dw = _high_precision_mm(dy.t(), x_saved)
        if dw is not None:
            dw = dw.to(ctx.w_dtype)
        if ctx.need_db:  # from the unquantized dY, summed in fp32 and written in dY's dtype, as TE's
            # bgrad_quantize allocates it; autograd then casts it to the bias's dtype
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def _kept(copy) -> tuple:
    """(the tensors that keep a columnwise copy for backward, what rebuilds it from them)."""
    if isinstance(copy, PackedOperand):
        return (copy.data, copy.scale, copy.amax), ("packed", copy.e4m3_max, copy.cols, copy.transposed)
    copy = copy or Operand(None, None)
    return (copy.values, copy.factor), ("values", copy.e4m3_max)


def _restored(tensors, layout):
    if layout[0] == "packed":
        return PackedOperand(*tensors, *layout[1:])
    return None if tensors[0] is None else Operand(*tensors, layout[1])


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     recipe: Optional[Recipe] = None, name: str = "linear") -> torch.Tensor:
    """F.linear with its three GEMMs in `recipe`'s format (plain F.linear when recipe is None).
    Under autocast the input is cast to the autocast dtype, as F.linear would be; the weight
    is quantized from its own (master) dtype, as TE does."""
    if recipe is None:
        if _saved_bytes is not None and torch.is_grad_enabled():  # autograd keeps, as cast, each
            # operand the other one's gradient needs
            cast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            _count_saved(x.numel() * (cast or x.dtype).itemsize if weight.requires_grad else 0,
                         weight.numel() * (cast or weight.dtype).itemsize if x.requires_grad else 0)
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


def drop_quantization(model: nn.Module) -> int:
    """Run the quantized modules of `model` in high precision from now on (a precision schedule's
    switch): their recipe becomes None, so their GEMMs are F.linear's. Returns how many switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, (Linear, LayerNormLinear, LayerNormMLP)) and module.recipe is not None:
            module.recipe = None
            switched += 1
    return switched


class LayerFactory:
    """Builds every linear layer of the model, so that backends swap without model changes.

    A layer runs in `recipe`'s format unless its name matches one of `keep_high_precision`
    (fnmatch patterns). backend="te" builds Transformer Engine modules for the quantized
    layers (all layers when recipe is None); kept layers stay PyTorch modules, which TE's
    autocast does not touch. `gemms` records (name, in, out, quantized) of every GEMM built,
    `names` the layers' names, `matched` the patterns that matched one.
    """

    def __init__(self, recipe: Optional[Recipe] = None, keep_high_precision=(),
                 backend: str = "emulated", eps: float = 1e-6):
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
        scales = q.scales[:x.shape[0]]  # the rows of x (a 16x16 tile's padded rows left out)
        used = scales[scales > 0]
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
