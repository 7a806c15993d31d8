"""The quantized linear layer: each GEMM against an independent computation, the guards, the
factory, and (where it loads) TE's reference GEMMs."""
import pytest
import torch

from conftest import requires_cuda
import nvfp4
from nvfp4 import FP8Recipe, NativeFP8Recipe, NVFP4Recipe, LayerFactory, collect_fp4_stats, quantized_linear
from nvfp4.formats import (PACKED, VALUES, NVFP4_ALPHA_DENOM, quantize_fp8, quantize_nvfp4,
                           random_hadamard_transform)
from nvfp4.linear import LayerNormMLP, Linear

RN = NVFP4Recipe(disable_stochastic_rounding=True)


def run_linear(recipe, x, w, b, dy):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = quantized_linear(x, w, b, recipe)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def gemm64(a_values, a_factor, b_values, b_factor, denom=NVFP4_ALPHA_DENOM):
    """The GEMM in float64 from quantized operands: alpha * (A @ B^T)."""
    alpha = (a_factor.double() * b_factor.double()) / denom
    return alpha * (a_values.double() @ b_values.double().t())


def inputs(m=64, k=32, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1,
            torch.randn(n, generator=g), torch.randn(m, n, generator=g) * 1e-3)


@pytest.mark.parametrize("recipe", [RN, NVFP4Recipe(disable_rht=True, disable_stochastic_rounding=True),
                                    NVFP4Recipe(disable_2d_quantization=True, disable_stochastic_rounding=True)])
def test_nvfp4_gemms_equal_manual_computation(recipe):
    x, w, b, dy = inputs()
    y, dx, dw, db = run_linear(recipe, x, w, b, dy)
    qx, qdy = quantize_nvfp4(x), quantize_nvfp4(dy)
    qw = quantize_nvfp4(w, tile_rows=1 if recipe.disable_2d_quantization else 16)
    qwt = quantize_nvfp4(w.t().contiguous(), tile_rows=1 if recipe.disable_2d_quantization else 16)
    rht = (lambda t: t) if recipe.disable_rht else random_hadamard_transform
    qxt, qdyt = quantize_nvfp4(rht(x.t().contiguous())), quantize_nvfp4(rht(dy.t().contiguous()))
    torch.testing.assert_close(y.double(), gemm64(qx.values(), qx.amax, qw.values(), qw.amax) + b.bfloat16().double(),
                               rtol=1e-6, atol=1e-6)  # fp32 activations: the bias in bf16, as TE
    torch.testing.assert_close(dx.double(), gemm64(qdy.values(), qdy.amax, qwt.values(), qwt.amax),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dw.double(), gemm64(qdyt.values(), qdyt.amax, qxt.values(), qxt.amax),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(db, dy.sum(0))


def test_rht_cancels_in_wgrad():
    # RHT is orthogonal: without quantization H H^T = I, so dW estimates dY^T X either way.
    x, w, b, dy = inputs(m=256)
    exact = dy.t() @ x
    errors = [(run_linear(NVFP4Recipe(disable_rht=r, disable_stochastic_rounding=True), x, w, b, dy)[2] - exact).norm()
              / exact.norm() for r in (False, True)]
    assert max(errors) < 0.25


@pytest.mark.parametrize("recipe", [FP8Recipe(), NativeFP8Recipe()], ids=["emulated", "native"])
def test_fp8_gemms_equal_manual_computation(recipe, monkeypatch):
    """Both FP8 paths: the emulation's bf16/fp32 GEMMs and torch._scaled_mm on the FP8 operands
    (here CPU's _scaled_mm; on GPUs test_native_fp8_agrees_with_the_emulation_on_cuda)."""
    real, calls = torch._scaled_mm, []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    x, w, b, dy = inputs()
    y, dx, dw, db = run_linear(recipe, x, w, b, dy)
    assert calls == ([torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e5m2] if recipe.native else [])
    # CPU's _scaled_mm applies scales other than 1 to about 1e-4 (its kernel, not the recipe's)
    rtol = 1e-4 if recipe.native else 1e-6
    qx, qw = quantize_fp8(x, torch.float8_e4m3fn), quantize_fp8(w, torch.float8_e4m3fn)
    qdy = quantize_fp8(dy, torch.float8_e5m2)
    torch.testing.assert_close(y.double(), gemm64(qx.values, qx.scale_inv, qw.values, qw.scale_inv, 1) + b.bfloat16().double(),
                               rtol=rtol, atol=1e-6)  # fp32 activations: the bias in bf16, as TE
    torch.testing.assert_close(dx.double(), gemm64(qdy.values, qdy.scale_inv, qw.values.t(), qw.scale_inv, 1),
                               rtol=rtol, atol=1e-9)
    torch.testing.assert_close(dw.double(), gemm64(qdy.values.t(), qdy.scale_inv, qx.values.t(), qx.scale_inv, 1),
                               rtol=rtol, atol=1e-9)


def test_native_fp8_takes_the_emulated_gemm_where_cublas_cannot(monkeypatch):
    """torch._scaled_mm needs dimensions that are multiples of 16: a 40-token GEMM multiplies the
    same FP8 values as the emulation, and gives its result."""
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("_scaled_mm on a 40-row operand"))
    x, w, b, dy = inputs(m=40)
    for got, want in zip(run_linear(NativeFP8Recipe(), x, w, b, dy), run_linear(FP8Recipe(), x, w, b, dy)):
        assert torch.equal(got, want)


def test_native_fp8_bias_rounds_once_in_bf16():
    """A bf16 output takes the bias in cuBLAS's epilogue (one rounding), as the emulation adds it
    to the fp32 product before its one rounding."""
    x, w, b, dy = (t.bfloat16() for t in inputs(m=64, k=64, n=32))
    qx, qw = quantize_fp8(x, torch.float8_e4m3fn), quantize_fp8(w, torch.float8_e4m3fn)
    want = (gemm64(qx.values, qx.scale_inv, qw.values, qw.scale_inv, 1) + b.double()).to(torch.bfloat16)
    assert torch.equal(run_linear(NativeFP8Recipe(), x, w, b, dy)[0], want)


@pytest.mark.parametrize("recipe", [NVFP4Recipe(), FP8Recipe()], ids=["nvfp4", "fp8"])
def test_bias_takes_te_dtypes(recipe):
    """TE 2.20 (pytorch/module/linear.py, the forward): with fp32 activations a quantized GEMM's
    bias is cast to bf16 first (cuBLAS takes no fp32 bias there), so X = W = 0 and b = 1 + 2^-10
    give Y = 1.0; the bias gradient is dY summed in fp32 and written in dY's dtype
    (csrc/extensions/bias.cpp: bgrad_quantize allocates dbias in grad_output's dtype), so under
    bf16 autocast dY = [1, 2^-8] gives db = bf16(1 + 2^-8) = 1.0, not 1.00390625."""
    x, w = torch.zeros(16, 32, requires_grad=True), torch.zeros(16, 32, requires_grad=True)
    b = torch.full((16,), 1 + 2 ** -10, requires_grad=True)
    y = quantized_linear(x, w, b, recipe)
    assert y.dtype == torch.float32 and torch.equal(y, torch.ones_like(y))
    assert torch.equal(quantized_linear(x, w, b, None), torch.full_like(y, 1 + 2 ** -10))  # unquantized: fp32
    dy = torch.zeros(16, 16)
    dy[0], dy[1] = 1.0, 2 ** -8
    y.backward(dy)
    assert b.grad.dtype == torch.float32 and torch.equal(b.grad, torch.full((16,), 1 + 2 ** -8))  # fp32 dY: exact
    b.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized_linear(x, w, b, recipe)
    y.backward(dy.to(y.dtype))
    assert b.grad.dtype == torch.float32 and torch.equal(b.grad, torch.ones(16))


@pytest.mark.parametrize("recipe, x_bytes, w_bytes", [
    # NVFP4's columnwise copies in TE's bytes: half a byte a code, an E4M3 byte per block of 16,
    # the fp32 amax (the 16x16-tile weight keeps its rowwise copy, the same values)
    (RN, 64 * 32 // 2 + 64 * 32 // 16 + 4, 48 * 32 // 2 + 48 * 32 // 16 + 4),
    # FP8's: values in the GEMM dtype (fp32 on CPU) and a 4-byte scale_inv
    (FP8Recipe(), 4 * 64 * 32 + 4, 4 * 48 * 32 + 4),
    (NativeFP8Recipe(), 64 * 32 + 4, 48 * 32 + 4),  # one byte an FP8 value
    (NVFP4Recipe(backward_override="dequantized"), 4 * 64 * 32, 4 * 48 * 32),
    (NVFP4Recipe(backward_override="high_precision"), 4 * 64 * 32, 4 * 48 * 32),
    (None, 4 * 64 * 32, 4 * 48 * 32)], ids=["nvfp4", "fp8", "fp8-native", "dequantized", "high_precision", "fp32"])
def test_count_saved_bytes_counts_what_backward_keeps(recipe, x_bytes, w_bytes):
    x, w, b, _ = inputs()
    x, w = x.requires_grad_(), w.requires_grad_()
    with nvfp4.linear.count_saved_bytes() as saved:
        quantized_linear(x, w, b, recipe)
        with torch.no_grad():  # nothing saved
            quantized_linear(x, w, b, recipe)
    assert saved == {"x": x_bytes, "w": w_bytes}
    with nvfp4.linear.count_saved_bytes() as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        quantized_linear(x, w.detach(), b, None)  # no dW: only W's bf16 copy, for dX
    assert saved == {"x": 0, "w": 2 * 48 * 32}


def test_against_te_reference_gemms(te_reference):
    ref, gemm = te_reference.reference_nvfp4, te_reference.gemm
    fmt = te_reference.reference_utils.Fp4Formats.E2M1
    x, w, b, dy = inputs(m=64, k=64, n=32)
    y, dx, dw, _ = run_linear(RN, x, w, torch.zeros_like(b), dy)
    act_q = ref.NVFP4QuantizerRef(dtype=fmt, quant_tile_shape=(1, 16), with_rht=True)
    w_q = ref.NVFP4QuantizerRef(dtype=fmt, quant_tile_shape=(16, 16), with_rht=False)
    qx, qw, qdy = act_q.quantize(x), w_q.quantize(w), act_q.quantize(dy)
    params = gemm.MMParams(out_dtype=torch.float32)

    def te_gemm(a, b, sa, sb, kind, qa, qb):
        return act_q.qgemm(a, b, params, torch.float32, sa, sb, gemm_type=kind, qresult_x=qa, qresult_w=qb)

    te_y = te_gemm(qx.data, qw.data, qx.scale, qw.scale, gemm.GEMMType.FPROP, qx, qw)
    te_dx = te_gemm(qdy.data, qw.data_t, qdy.scale, qw.scale_t, gemm.GEMMType.DGRAD, qdy, qw)
    te_dw = te_gemm(qdy.data_t, qx.data_t, qdy.scale_t, qx.scale_t, gemm.GEMMType.WGRAD, qdy, qx)
    # Same quantized operands; fp32 accumulation order is the only difference.
    for mine, theirs in ((y, te_y), (dx, te_dx), (dw, te_dw)):
        torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=1e-7)


def test_stochastic_rounding_makes_gradients_unbiased():
    x, w, b, dy = inputs(m=32, k=32, n=32)
    dy = dy * 1e3
    exact = dy.t() @ x
    sr = torch.stack([run_linear(NVFP4Recipe(disable_rht=True), x, w, b, dy)[2] for _ in range(300)]).mean(0)
    rn = run_linear(NVFP4Recipe(disable_rht=True, disable_stochastic_rounding=True), x, w, b, dy)[2]
    rn_quantized_x = quantize_nvfp4(x.t().contiguous())
    expected = dy.t().double() @ rn_quantized_x.dequantize().t().double()  # only dY rounds stochastically
    assert (sr.double() - expected).norm() < 0.5 * (rn.double() - expected).norm()
    assert (sr - exact).norm() / exact.norm() < 0.3


def test_under_autocast_and_3d_inputs():
    layer = Linear(32, 48, recipe=NVFP4Recipe())
    x = torch.randn(4, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == (4, 16, 48) and y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.abs().sum() > 0


def test_shape_and_dtype_guards():
    layer = Linear(24, 32, recipe=NVFP4Recipe())
    with pytest.raises(ValueError, match="in_features K = 24 is not a multiple of 16"):
        layer(torch.randn(16, 24))
    layer = Linear(32, 32, recipe=NVFP4Recipe())
    with pytest.raises(ValueError, match="tokens per step M = 10"):
        layer(torch.randn(10, 32))
    with torch.no_grad():
        assert layer(torch.randn(10, 32)).shape == (10, 32)  # inference needs no M blocks
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(16, 32, dtype=torch.int64))


def test_non_contiguous_input_is_copied_not_misread():
    layer = Linear(32, 16, recipe=RN)
    x = torch.randn(32, 32)
    torch.testing.assert_close(layer(x.t()), layer(x.t().contiguous()), rtol=0, atol=0)


def test_factory_keeps_named_layers_high_precision():
    factory = LayerFactory(NVFP4Recipe(), keep_high_precision=("patch_embed", "decoder_*"))
    first = factory.linear("patch_embed", 48, 64)
    middle = factory.norm_mlp("blocks.0.mlp", 64, 256)
    last = factory.linear("decoder_pred", 64, 48)
    assert first.recipe is None and last.recipe is None and isinstance(middle.recipe, NVFP4Recipe)
    assert [g[0] for g in factory.gemms if g[3]] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert isinstance(middle, LayerNormMLP)
    assert set(dict(middle.named_parameters())) == {"layer_norm_weight", "layer_norm_bias", "fc1_weight",
                                                    "fc1_bias", "fc2_weight", "fc2_bias"}


def test_fp4_stats():
    layer = LayerNormMLP(32, 64, recipe=NVFP4Recipe(), name="mlp")
    with collect_fp4_stats() as stats:
        layer(torch.randn(32, 32)).backward(torch.randn(32, 32))
    assert set(stats.rows) == {f"mlp.{fc}.{op}" for fc in ("fc1", "fc2") for op in ("X", "W", "dY")}
    for row in stats.rows.values():
        assert 0 <= row["flushed_to_zero"] <= 1 and 0 < row["at_block_max"] <= 1
        assert 0 < row["scale_min"] <= row["scale_max"] <= 448 and 0 < row["rel_error"] < 1
    # one value of 6 and fifteen of 0.01 per block: 0.01 scales to 0.01 < 0.25 and flushes
    x = torch.full((16, 32), 0.01)
    x[:, ::16] = 6.0
    stats.record("probe", "x", x, quantize_nvfp4(x))
    row = stats.rows["probe.X"]
    assert row["flushed_to_zero"] == 15 / 16 and row["at_block_max"] == 1 / 16
    assert row["scale_min"] == row["scale_max"] == 448.0
    assert abs(row["rel_error"] - (0.01 * 15 ** 0.5) / (36 + 15e-4) ** 0.5) < 1e-6


def test_compiles_without_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    x, w, b, dy = inputs()

    def step(x, w, b):
        return quantized_linear(x, w, b, RN)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fn in (step, compiled):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, b)
        y.backward(dy)
        if fn is step:
            expected = (y, xx.grad, ww.grad)
    for got, want in zip((y, xx.grad, ww.grad), expected):
        assert torch.equal(got, want)


@requires_cuda
def test_cuda_matches_cpu_bitwise_quantization():
    x = torch.randn(256, 128, dtype=torch.bfloat16)
    for tile in (1, 16):
        cpu, gpu = quantize_nvfp4(x, tile), quantize_nvfp4(x.cuda(), tile)
        assert torch.equal(cpu.values(), gpu.values().cpu()) and torch.equal(cpu.amax, gpu.amax.cpu())
    cpu_t = quantize_nvfp4(random_hadamard_transform(x.t().contiguous()))
    gpu_t = quantize_nvfp4(random_hadamard_transform(x.cuda().t().contiguous()))
    assert torch.equal(cpu_t.values(), gpu_t.values().cpu())


@requires_cuda
def test_cuda_compiled_operands_are_bitwise_eager():
    """On GPUs operands go through the Triton kernel (IEEE division); compiled == eager."""
    from nvfp4.linear import _quantize
    torch._dynamo.reset()
    x = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16) * 3
    x[0, :16] = 0

    def operands(x):  # TE's bytes (data, scale, amax) and the GEMM values of each copy
        row, col, _ = _quantize(RN, "x", x, "probe", row=PACKED, col=PACKED)
        row_values, col_values, _ = _quantize(RN, "x", x, "probe", row=VALUES, col=VALUES)
        w = _quantize(RN, "w", x, "probe", row=PACKED)[0]
        return [*row[:3], *col[:3], *w[:3], row_values.values, col_values.values]

    for eager, compiled in zip(operands(x), torch.compile(operands)(x)):
        assert eager.dtype == compiled.dtype and torch.equal(eager.reshape(-1).view(torch.uint8), compiled.reshape(-1).view(torch.uint8))


def fp8_gemm_magnitudes(x, w, dy):
    """|A| @ |B| of the three FP8 GEMMs (fprop, dgrad, wgrad) in dequantized values: the scale of
    a GEMM's rounding error, whatever the order of its sums."""
    qx, qw = (quantize_fp8(t, torch.float8_e4m3fn) for t in (x, w))
    qdy = quantize_fp8(dy, torch.float8_e5m2)
    ax, aw, ady = ((q.values.abs() * q.scale_inv).double() for q in (qx, qw, qdy))
    return ax @ aw.t(), ady @ aw, ady.t() @ ax


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fp8_agrees_with_the_emulation_on_cuda(dtype):
    """torch._scaled_mm on FP8 tensor cores against the emulation's bf16 GEMMs of the same FP8
    values: the same products, summed in another order, and by Hopper's FP8 MMA, whose
    accumulator keeps about 14 bits between cuBLAS's promotions to fp32 (DeepSeek-V3 report,
    sec. 3.3.2; TE's FP8 GEMMs on Hopper share it). So they agree to 2^-9 of |A| @ |B| (a wrong
    scale, operand or layout is off by the size of the result), plus one rounding of a bf16
    output; eager and compiled."""
    x, w, b, dy = (t.cuda().to(dtype) for t in inputs(m=256, k=384, n=128))
    native, emulated = run_linear(NativeFP8Recipe(), x, w, b, dy), run_linear(FP8Recipe(), x, w, b, dy)
    magnitudes = fp8_gemm_magnitudes(x, w, dy)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 0.0

    def close(got, want, magnitude):
        error = (got.double() - want.double()).abs()
        assert (error <= 2 ** -9 * magnitude + ulp * want.double().abs() + 1e-7).all(), error.max()
    for got, want, magnitude in zip(native[:3], emulated[:3], magnitudes):
        close(got, want, magnitude)
    assert torch.equal(native[3], emulated[3])  # the bias gradient: dY's sum, unquantized
    compiled = torch.compile(lambda x, w, b: quantized_linear(x, w, b, NativeFP8Recipe()))
    xx = x.clone().requires_grad_()
    y = compiled(xx, w, b)
    y.backward(dy)
    close(y.detach(), native[0], magnitudes[0])
    close(xx.grad, native[1], magnitudes[1])


def cuda_matches_cpu(recipe):
    """The layer on CUDA (Triton kernels) gives the CPU reference's outputs and gradients, up to
    fp32 summation order; returns the inputs and the CPU results."""
    torch._dynamo.reset()
    x, w, b, dy = inputs(m=256, k=128, n=64)
    cpu = run_linear(recipe, x, w, b, dy)
    gpu = run_linear(recipe, *(t.cuda() for t in (x, w, b, dy)))
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(c, g.cpu(), rtol=1e-5, atol=1e-6)
    return (x, w, b, dy), cpu


@requires_cuda
def test_cuda_linear_matches_cpu_and_compiles():
    (x, w, b, dy), _ = cuda_matches_cpu(RN)
    compiled = torch.compile(lambda x, w, b: quantized_linear(x, w, b, NVFP4Recipe()))
    xx = x.cuda().requires_grad_()
    compiled(xx, w.cuda().requires_grad_(), b.cuda()).backward(dy.cuda())
    assert torch.isfinite(xx.grad).all()


@requires_cuda
@pytest.mark.parametrize("recipe", [
    NVFP4Recipe(nvfp4_4over6="all", disable_rht=True, disable_stochastic_rounding=True),
    NVFP4Recipe(nvfp4_4over6="weights", nvfp4_4over6_err_mode="MSE", disable_stochastic_rounding=True),
    NVFP4Recipe(nvfp4_4over6="all", disable_rht=True, disable_2d_quantization=True,
                nvfp4_4over6_e4m3_use_256="activations", disable_stochastic_rounding=True),
    NVFP4Recipe(row_scaled_activation=True, disable_stochastic_rounding=True),
    NVFP4Recipe(row_scaled_activation=True, nvfp4_4over6="activations", disable_rht=True,
                disable_stochastic_rounding=True),
    NVFP4Recipe(backward_override="dequantized"), NVFP4Recipe(backward_override="high_precision"),
    FP8Recipe(backward_override="dequantized")], ids=lambda r: repr(r)[:60])
def test_cuda_recipe_options_match_cpu_and_compile(recipe):
    """Every recipe option through the Triton kernels (4over6, 256 bound, row-scaled amaxes and
    the fused GEMM's per-row alpha, the dequantized copy) gives the CPU reference's GEMMs, up to
    fp32 summation order; and compiles."""
    (x, w, b, dy), cpu = cuda_matches_cpu(recipe)
    compiled = torch.compile(lambda x, w, b: quantized_linear(x, w, b, recipe))
    xx, ww = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    y = compiled(xx, ww, b.cuda())
    y.backward(dy.cuda())
    torch.testing.assert_close(y.detach().cpu(), cpu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ww.grad.cpu(), cpu[2], rtol=1e-5, atol=1e-6)
