"""Every NVFP4BlockScaling option against Transformer Engine's own reference quantizer and GEMM
(`reference_nvfp4.py` of TE 2.20, loaded by the `te_reference` fixture): codes, E4M3 scales and
amaxes bit for bit, rowwise and columnwise, 1x16 and 16x16, fp32 / bf16 / fp16 inputs, padded
shapes, ties, E4M3 boundaries, denormals, outliers, NaN and Inf."""
import pytest
import torch

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
    assert_same(mine.scales, scale.to(torch.float32)[:rows], what + " scales")
    assert_same(mine.amax.reshape(-1), amax.reshape(-1), what + " amax")


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
def test_nan_and_inf_against_te(te_reference, special):
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    x[5, 7] = special
    for quantizer in [(1, False, None, 448, False), (16, False, None, 448, False),
                      (1, False, "MAE", 256, False), (1, False, None, 448, True)]:
        assert_matches_te(te_reference, x, *quantizer)


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
