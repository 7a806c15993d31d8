"""Every NVFP4BlockScaling option against Transformer Engine's own reference quantizer and GEMM
(`reference_nvfp4.py` of TE 2.20, loaded by the `te_reference` fixture): codes, E4M3 scales and
amaxes bit for bit, rowwise and columnwise, 1x16 and 16x16, fp32 / bf16 / fp16 inputs, padded
shapes, ties, E4M3 boundaries, denormals, outliers, NaN and Inf."""
import pytest
import torch

from conftest import requires_cuda

from nvfp4.formats import NVFP4Recipe, quantize_nvfp4, random_hadamard_transform

SHAPES = [(64, 128), (33, 50), (48, 96), (16, 16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tile_rows, rht, four_over_six, e4m3_max, row_scaled): the quantizers TE's recipe builds and more
QUANTIZERS = [
    (1, True, None, 448, False),      # inputs and gradients (default recipe)
    (16, False, None, 448, False),    # weights (default recipe)
    (1, False, None, 448, False),     # weights with disable_2d_quantization, or RHT off
    (1, True, None, 448, True),       # row_scaled_activation
    (1, False, "MAE", 256, False),    # nvfp4_4over6, default e4m3 bound 256
    (1, False, "MSE", 256, False),
    (1, False, "MAE", 448, False),    # nvfp4_4over6_e4m3_use_256 = none
    (16, False, "MAE", 256, False),   # 4over6 weights in 16x16 tiles
    (16, False, "MSE", 448, False),
    (1, False, "MSE", 256, True),     # 4over6 + row-scaled inputs
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous().view(torch.int32)


def assert_same(actual, expected, what):
    """Equal bit patterns (so -0.0 != 0.0), NaN equal to NaN."""
    actual, expected = actual.to(torch.float32), expected.to(torch.float32)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    nan = torch.isnan(actual) & torch.isnan(expected)
    mismatch = (bits(actual) != bits(expected)) & ~nan
    assert not mismatch.any(), (f"{what}: {int(mismatch.sum())} of {mismatch.numel()} differ, e.g. "
                                f"{actual[mismatch][:4].tolist()} vs {expected[mismatch][:4].tolist()}")


def te_quantizer(te_reference, tile_rows, rht, four_over_six, e4m3_max, row_scaled):
    ref = te_reference.reference_nvfp4
    return ref.NVFP4QuantizerRef(
        dtype=te_reference.reference_utils.Fp4Formats.E2M1, quant_tile_shape=(tile_rows, 16), with_rht=rht,
        row_scaled_nvfp4=row_scaled, nvfp4_use_4over6=four_over_six is not None, nvfp4_e4m3_max=e4m3_max,
        nvfp4_4over6_err_mode=four_over_six or "MAE")


def assert_copy_matches(te_reference, mine, data, scale, amax, rows, cols, what):
    """One quantized copy: our codes, scales and amax against TE's packed bytes, E4M3 scales, amax."""
    codes = te_reference.reference_nvfp4.cast_from_fp4x2(data, torch.float32)[:rows, :cols]
    cols = codes.shape[1]  # TE's reference packs pairs and drops an odd last column (M // 2 bytes)
    # TE's cast maps NaN to code 0 (no threshold holds); ours keeps NaN: both dequantize to NaN
    assert_same(torch.where(torch.isnan(mine.codes), 0.0, mine.codes)[:, :cols], codes, what + " codes")
    assert_same(mine.scales, scale.to(torch.float32), what + " scales")  # TE's shape: 16x16 tiles' padded rows
    # NaN included: the amax's bit pattern is TE's (what TE's torch ops give it)
    assert torch.equal(bits(mine.amax.reshape(-1)), bits(amax.reshape(-1))), (
        what + " amax bits", [hex(v & 0xFFFFFFFF) for v in bits(mine.amax.reshape(-1))[:2].tolist()],
        [hex(v & 0xFFFFFFFF) for v in bits(amax.reshape(-1))[:2].tolist()])
    packed, scale_bytes = mine.packed()  # TE's own bytes and shapes: codes two a byte, E4M3 scales
    assert torch.equal(packed, data), (what + " packed bytes", tuple(packed.shape), tuple(data.shape))
    ours, te = scale_bytes.view(torch.uint8), scale.view(torch.uint8)
    assert torch.equal(ours, te), (what + " scale bytes", ours[ours != te][:4].tolist(), te[ours != te][:4].tolist())


def assert_matches_te(te_reference, x, tile_rows, rht, four_over_six, e4m3_max, row_scaled):
    te = te_quantizer(te_reference, tile_rows, rht, four_over_six, e4m3_max, row_scaled).quantize(x)
    rows, cols = x.shape
    options = dict(tile_rows=tile_rows, four_over_six=four_over_six, e4m3_max=e4m3_max, row_scaled=row_scaled)
    mine = quantize_nvfp4(x, **options)
    assert_copy_matches(te_reference, mine, te.data, te.scale, te.global_amax_row, rows, cols, "rowwise")
    xt = x.t().contiguous()
    mine_t = quantize_nvfp4(random_hadamard_transform(xt) if rht else xt, **options)
    assert_copy_matches(te_reference, mine_t, te.data_t, te.scale_t, te.global_amax_col, cols, rows, "columnwise")
    return mine


def padded(shape, tile_rows):
    rows, cols = shape
    return rows if tile_rows == 1 else -(-rows // 16) * 16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: "-".join(map(str, q)))
def test_quantizer_bitwise_against_te(te_reference, shape, dtype, quantizer):
    tile_rows, rht, *_ = quantizer
    if rht and (shape[0] % 16 or shape[1] % 16):
        pytest.skip("RHT needs both dims in blocks of 16 (the columnwise copy transforms tokens)")
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])  # columns of many magnitudes
    x[0, :16] = 0                          # an all-zero block
    x[-1, :shape[1] // 2] *= 1e-4           # small blocks: E4M3 subnormal scales
    assert_matches_te(te_reference, x.to(dtype), *quantizer)


def test_4over6_picks_both_candidates_and_ties_go_to_map_to_6(te_reference):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    mine = assert_matches_te(te_reference, x, 1, False, "MAE", 256, False)
    map6 = torch.div(x.abs().view(64, 8, 16).amax(-1), 6.0) * (1536 / mine.amax)  # map-to-4: 1.5x this
    chose4 = mine.scales > map6 * 1.25
    assert 0.05 < chose4.float().mean() < 0.95, "random blocks should choose map-to-4 and map-to-6"
    # ties with different candidates: blocks [6, v, 0, ...] in a tensor of amax 6 map v to round(v)
    # (map-to-6, scale 256) or 1.5 round(v / 1.5) (map-to-4, scale 384), both errors exact and
    # equal for these v: TE keeps map-to-6
    tie = torch.zeros(7, 32)
    tie[:, 0] = 6.0
    tie[:, 1] = torch.tensor([0.625, 0.875, 1.25, 1.75, 2.125, 3.5, 4.25])
    for err_mode in ("MAE", "MSE"):
        q = assert_matches_te(te_reference, tie, 1, False, err_mode, 256, False)
        assert (q.scales[:, 0] == 256).all() and torch.equal(q.codes[:, 1], torch.tensor([0.5, 1, 1, 2, 2, 4, 4.]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_against_te(te_reference, dtype):
    """E4M3 scale boundaries (448, the subnormal 2^-9), an outlier 1e4 x the rest, denormal
    inputs, and every E2M1 rounding threshold."""
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros(32, 64)
    x[0, :16] = torch.linspace(-6, 6, 16)                   # thresholds of E2M1 after scaling
    x[1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    x[2] = 1e4                                               # the outlier block that sets amax
    x[3, :16] = 1e4 / 448 / 6 * 2.0 ** -9                    # a block scale at E4M3's smallest subnormal
    x[4, :16] = tiny * torch.arange(16)                      # denormal-adjacent inputs
    x[5] = torch.randn(64, generator=torch.Generator().manual_seed(2))
    for quantizer in [(1, False, None, 448, False), (16, False, None, 448, False), (1, True, None, 448, False),
                      (1, False, "MAE", 256, False), (1, False, "MSE", 448, True)]:
        assert_matches_te(te_reference, x.to(dtype), *quantizer)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_against_te(te_reference, special, dtype):
    """NaN and inf inputs through every quantizer, NaN bit patterns included: the amax (torch's max
    writes a NaN of fp32 as 0xffffffff) and the E4M3 scale bytes (0x7f or 0xff by TE's op sequence)."""
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    x[5, 7] = special
    for quantizer in QUANTIZERS:
        assert_matches_te(te_reference, x.to(dtype), *quantizer)


def test_recipe_builds_te_quantizers():
    """Which operand each recipe field reaches, per TE's NVFP4BlockScalingRecipeState."""
    recipe = NVFP4Recipe(disable_rht=True, nvfp4_4over6="all", row_scaled_activation=True,
                         nvfp4_4over6_e4m3_use_256="weights", nvfp4_4over6_err_mode="MSE")
    x, w, dy = (recipe.quantizer(kind) for kind in ("x", "w", "dy"))
    assert (x.four_over_six, x.e4m3_max, x.row_scaled, x.tile_rows) == ("MSE", 448, True, 1)
    assert (w.four_over_six, w.e4m3_max, w.row_scaled, w.tile_rows) == ("MSE", 256, False, 16)
    assert (dy.four_over_six, dy.row_scaled, dy.stochastic) == (None, False, True)  # gradients: standard
    weights = NVFP4Recipe(nvfp4_4over6="weights")  # RHT stays on: it never touches weights
    assert weights.quantizer("w").four_over_six == "MAE" and weights.quantizer("x").four_over_six is None
    assert weights.quantizer("x").rht and weights.quantizer("w").e4m3_max == 256
    for scope in ("activations", "all"):
        with pytest.raises(ValueError, match="needs disable_rht"):
            NVFP4Recipe(nvfp4_4over6=scope)
    with pytest.raises(ValueError, match="backward_override"):
        NVFP4Recipe(backward_override="fp8")


def test_quantizer_argument_checks():
    x = torch.randn(16, 32)
    with pytest.raises(ValueError, match="four_over_six"):
        quantize_nvfp4(x, four_over_six="L1")
    with pytest.raises(ValueError, match="stochastic"):
        quantize_nvfp4(x, four_over_six="MAE", stochastic=True)
    with pytest.raises(ValueError, match="4over6 tensors only"):
        quantize_nvfp4(x, e4m3_max=256)
    with pytest.raises(ValueError, match="e4m3_max"):
        quantize_nvfp4(x, four_over_six="MAE", e4m3_max=300)
    with pytest.raises(ValueError, match="row_scaled needs 1x16"):
        quantize_nvfp4(x, tile_rows=16, row_scaled=True)
    assert quantize_nvfp4(x, four_over_six="mse").codes.shape == x.shape  # TE upper-cases the mode


# ---- The linear layer's three GEMMs against TE's reference qgemm ------------------------------

def te_quantizer_for(te_reference, spec):
    """TE's reference quantizer for one of our NVFP4Quantizer specs (rounding to nearest: TE's
    Python reference has no stochastic rounding)."""
    return te_quantizer(te_reference, spec.tile_rows, spec.rht, spec.four_over_six, spec.e4m3_max, spec.row_scaled)


def run_layer(recipe, x, w, b, dy):
    from nvfp4 import quantized_linear
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = quantized_linear(x, w, b, recipe)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def layer_inputs(dtype, m=96, k=64, n=32, seed=0):  # K of each GEMM % 32, as TE's qgemm asks
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)
    return (x.to(dtype), torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g),
            (torch.randn(m, n, generator=g) * 1e-3).to(dtype))


RECIPES = {
    "default": NVFP4Recipe(disable_stochastic_rounding=True),
    "no-rht": NVFP4Recipe(disable_rht=True, disable_stochastic_rounding=True),
    "no-2d": NVFP4Recipe(disable_2d_quantization=True, disable_stochastic_rounding=True),
    "row-scaled": NVFP4Recipe(row_scaled_activation=True, disable_stochastic_rounding=True),
    "4over6-weights": NVFP4Recipe(nvfp4_4over6="weights", disable_stochastic_rounding=True),
    "4over6-all-MSE": NVFP4Recipe(nvfp4_4over6="all", nvfp4_4over6_err_mode="MSE", disable_rht=True,
                                  disable_stochastic_rounding=True),
    "4over6-all-448": NVFP4Recipe(nvfp4_4over6="all", nvfp4_4over6_e4m3_use_256="none", disable_rht=True,
                                  disable_stochastic_rounding=True, disable_2d_quantization=True),
    "4over6-act-row-scaled": NVFP4Recipe(nvfp4_4over6="activations", nvfp4_4over6_e4m3_use_256="activations",
                                         row_scaled_activation=True, disable_rht=True,
                                         disable_stochastic_rounding=True),
}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_gemms_against_te(te_reference, name, dtype):
    """fprop, dgrad and wgrad of our layer equal TE's reference qgemm on TE's quantized operands
    (the GEMM epilogue with per-row amaxes, and the 256 bound's alpha, included), up to the fp32
    summation order; the bias is added in the output dtype, cast to bf16 first where that is fp32
    (TE's module/linear.py); the bias gradient is dY summed in fp32, in dY's dtype (bgrad_quantize)."""
    gemm = te_reference.gemm
    recipe = RECIPES[name]
    x, w, b, dy = layer_inputs(dtype)
    y, dx, dw, db = run_layer(recipe, x, w, b, dy)
    quantizers = {kind: te_quantizer_for(te_reference, recipe.quantizer(kind)) for kind in ("x", "w", "dy")}
    qx, qw, qdy = quantizers["x"].quantize(x), quantizers["w"].quantize(w), quantizers["dy"].quantize(dy)

    def te_gemm(a, b_, sa, sb, kind, qa, qb, out_dtype):
        return quantizers["x"].qgemm(a, b_, gemm.MMParams(out_dtype=out_dtype), out_dtype, sa, sb,
                                     gemm_type=kind, qresult_x=qa, qresult_w=qb)

    te_y = te_gemm(qx.data, qw.data, qx.scale, qw.scale, gemm.GEMMType.FPROP, qx, qw, torch.float32)
    te_dx = te_gemm(qdy.data, qw.data_t, qdy.scale, qw.scale_t, gemm.GEMMType.DGRAD, qdy, qw, dtype)
    te_dw = te_gemm(qdy.data_t, qx.data_t, qdy.scale_t, qx.scale_t, gemm.GEMMType.WGRAD, qdy, qx, dtype)
    tolerance = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(y, (te_y + b.to(torch.bfloat16).float()).to(dtype), **tolerance)
    torch.testing.assert_close(dx, te_dx, **tolerance)
    torch.testing.assert_close(dw, te_dw.float(), **tolerance)  # TE writes wgrad in the activation dtype
    torch.testing.assert_close(db, dy.float().sum(0).to(dtype).float())


def test_unpacked_bytes_are_te_codes(te_reference):
    """Every byte of TE's packed data decodes to TE's two codes (cast_from_fp4x2: low nibble
    first), -0.0 included; an odd width drops the last high nibble."""
    from nvfp4.formats import unpack_e2m1
    data = torch.arange(256, dtype=torch.uint8).view(16, 16)
    te_codes = te_reference.reference_nvfp4.cast_from_fp4x2(data, torch.float32)
    assert torch.equal(unpack_e2m1(data, 32).view(torch.int32), te_codes.view(torch.int32))
    assert torch.equal(unpack_e2m1(data, 31).view(torch.int32), te_codes[:, :31].view(torch.int32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["default", "no-rht", "no-2d", "row-scaled", "4over6-weights", "4over6-all-MSE"])
def test_layer_keeps_te_bytes_for_backward(te_reference, name, device):
    """What the layer saves for backward is TE's columnwise copies, byte for byte: RHT(X^T)'s
    (X^T's without RHT) packed codes and E4M3 scales, and W's (a 16x16-tile W: its rowwise copy,
    whose transpose is the columnwise one) with their amaxes; not bf16 values, not X. On CUDA
    the Triton kernels write them (bf16 input: the RHT's sums rounded to bf16, which fp32
    summation orders rarely change)."""
    from nvfp4 import quantized_linear
    recipe = RECIPES[name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b, _ = layer_inputs(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.cpu()) or t, lambda t: t):
        quantized_linear(x.to(device).requires_grad_(), w.to(device).requires_grad_(), b.to(device), recipe)
    x_data, x_scale, x_amax, w_data, w_scale, w_amax = saved
    qx = te_quantizer_for(te_reference, recipe.quantizer("x")).quantize(x)
    qw = te_quantizer_for(te_reference, recipe.quantizer("w")).quantize(w)
    w_rowwise = recipe.quantizer("w").tile_rows == 16 and recipe.quantizer("w").four_over_six is None
    te_w = (qw.data, qw.scale, qw.global_amax_row) if w_rowwise else (qw.data_t, qw.scale_t, qw.global_amax_col)
    for (data, scale, amax), (te_data, te_scale, te_amax), what in (
            ((x_data, x_scale, x_amax), (qx.data_t, qx.scale_t, qx.global_amax_col), "x"),
            ((w_data, w_scale, w_amax), te_w, "w")):
        rows, blocks = scale.shape
        te_scale, te_amax = te_scale[:rows, :blocks].view(torch.uint8), te_amax.reshape(-1)
        assert data.dtype == torch.uint8, what
        if what == "x" and device == "cuda" and recipe.quantizer("x").rht:
            assert (data == te_data[:rows]).float().mean() > 0.99, what + " codes"
            assert (scale.view(torch.uint8) == te_scale).float().mean() > 0.99, what + " scales"
            torch.testing.assert_close(amax.reshape(-1), te_amax, rtol=2.0 ** -8, atol=0)
            continue
        assert torch.equal(data, te_data[:rows]), what + " codes"
        assert torch.equal(scale.view(torch.uint8), te_scale), what + " scales"
        assert torch.equal(amax.reshape(-1), te_amax), what + " amax"


def te_dequantize(te_reference, q, rows, cols, rowwise=True):
    """TE's dequantize kernel on TE's reference bytes: code * ((scale * amax) * (1 / (6 * e4m3_max)))."""
    data, scale, amax = (q.data, q.scale, q.global_amax_row) if rowwise else (q.data_t, q.scale_t, q.global_amax_col)
    codes = te_reference.reference_nvfp4.cast_from_fp4x2(data, torch.float32)[:rows, :cols]
    amax = amax.reshape(-1, 1) if amax.numel() > 1 else amax
    factor = (scale.to(torch.float32)[:rows] * amax) * torch.tensor(1.0 / (6 * q.nvfp4_e4m3_max))
    return codes * factor.repeat_interleave(16, dim=1)[:, :cols]


@pytest.mark.parametrize("name", ["default", "row-scaled", "4over6-all-MSE"])
@pytest.mark.parametrize("override", ["high_precision", "dequantized"])
def test_backward_override_against_te(te_reference, name, override):
    """TE's backward_override: the forward GEMM as without it; dgrad and wgrad unquantized, from x
    and W (high_precision) or from the forward's rowwise copies, dequantized (dequantized)."""
    from dataclasses import replace
    gemm = te_reference.gemm
    recipe = replace(RECIPES[name], backward_override=override)
    x, w, b, dy = layer_inputs(torch.float32)
    y, dx, dw, _ = run_layer(recipe, x, w, b, dy)
    y_plain, *_ = run_layer(RECIPES[name], x, w, b, dy)
    assert torch.equal(y, y_plain)
    if override == "high_precision":
        x_used, w_used = x, w
    else:
        qx = te_quantizer_for(te_reference, recipe.quantizer("x")).quantize(x)
        qw = te_quantizer_for(te_reference, recipe.quantizer("w")).quantize(w)
        x_used, w_used = te_dequantize(te_reference, qx, *x.shape), te_dequantize(te_reference, qw, *w.shape)
        assert not torch.equal(x_used, x)
    torch.testing.assert_close(dx.double(), dy.double() @ w_used.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw.double(), dy.double().t() @ x_used.double(), rtol=1e-5, atol=1e-7)
    assert gemm.GEMMType.WGRAD  # the reference GEMM module loaded (its types name the GEMMs above)


def test_fp8_backward_override():
    from nvfp4.formats import FP8Recipe, quantize_fp8
    x, w, b, dy = layer_inputs(torch.float32)
    _, dx, dw, _ = run_layer(FP8Recipe(backward_override="dequantized"), x, w, b, dy)
    qx, qw = quantize_fp8(x, torch.float8_e4m3fn), quantize_fp8(w, torch.float8_e4m3fn)
    torch.testing.assert_close(dx, dy @ (qw.values * qw.scale_inv), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, dy.t() @ (qx.values * qx.scale_inv), rtol=1e-5, atol=1e-7)
    _, dx, dw, _ = run_layer(FP8Recipe(backward_override="high_precision"), x, w, b, dy)
    torch.testing.assert_close(dx, dy @ w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-5, atol=1e-7)


# ---- The recipe against TE's recipe class ------------------------------------------------------

TE_ONLY_FIELDS = {"fp4_format", "fp8_format", "fp8_dpa", "fp8_mha"}  # fixed formats; attention is not quantized


def test_recipe_has_every_te_field_with_te_defaults(te_recipes):
    from dataclasses import fields
    from nvfp4.formats import FP8Recipe
    te_fields = {f.name: f.default for f in fields(te_recipes.NVFP4BlockScaling)}
    ours = {f.name: f.default for f in fields(NVFP4Recipe)}
    assert set(te_fields) - TE_ONLY_FIELDS == set(ours), "NVFP4BlockScaling's fields changed"
    for name, default in ours.items():  # TE's defaults come from env vars: unset here
        assert te_fields[name] == default, name
    assert {f.name for f in fields(FP8Recipe)} <= {f.name for f in fields(te_recipes.Float8CurrentScaling)}
    from nvfp4.formats import BACKWARD_OVERRIDES, FOUR_OVER_SIX_ERR_MODES, SCOPES
    assert (SCOPES, FOUR_OVER_SIX_ERR_MODES, BACKWARD_OVERRIDES) == (
        te_recipes._NVFP4_4OVER6_SCOPES, te_recipes._NVFP4_4OVER6_ERR_MODES, te_recipes._BACKWARD_OVERRIDES)


def test_te_backend_builds_te_recipe_from_ours(te_recipes, monkeypatch):
    """te_backend.te_recipe passes every field under its name; TE's own checks accept it, and its
    QParams say what our quantizers do (RHT, stochastic rounding, 2D weights)."""
    import sys
    import types
    from nvfp4 import te_backend
    from nvfp4.formats import FP8Recipe
    package = types.ModuleType("transformer_engine.common")
    package.recipe = te_recipes
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", te_recipes)
    te_backend.te_recipe.cache_clear()
    try:
        ours = NVFP4Recipe(disable_rht=True, disable_2d_quantization=True, row_scaled_activation=True,
                           nvfp4_4over6="all", nvfp4_4over6_e4m3_use_256="weights", nvfp4_4over6_err_mode="MSE",
                           backward_override="dequantized")
        te = te_backend.te_recipe(ours)
        assert isinstance(te, te_recipes.NVFP4BlockScaling)
        for name in (f for f in vars(ours) if not f.startswith("_")):
            assert getattr(te, name) == getattr(ours, name), name
        assert not te.fp4_quant_fwd_inp.random_hadamard_transform and not te.fp4_quant_fwd_weight.fp4_2d_quantization
        default = te_backend.te_recipe(NVFP4Recipe())
        for kind, qparams in (("x", default.fp4_quant_fwd_inp), ("w", default.fp4_quant_fwd_weight),
                              ("dy", default.fp4_quant_bwd_grad)):
            spec = NVFP4Recipe().quantizer(kind)
            assert (qparams.random_hadamard_transform, qparams.stochastic_rounding, qparams.fp4_2d_quantization) == (
                spec.rht, spec.stochastic, spec.tile_rows == 16), kind
        fp8 = te_backend.te_recipe(FP8Recipe(backward_override="high_precision"))
        assert isinstance(fp8, te_recipes.Float8CurrentScaling) and fp8.backward_override == "high_precision"
    finally:
        te_backend.te_recipe.cache_clear()
