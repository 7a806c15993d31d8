"""NVFP4 / FP8 numerics against the NumPy oracle and, where it loads, TE's own reference."""
import numpy as np
import pytest
import torch

import oracle
from nvfp4.formats import (fake_quantize, quantize_fp8, quantize_nvfp4, random_bits, random_hadamard_transform,
                           round_e2m1, stochastic_round_e2m1)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 != 0.0 and NaN == NaN compare as TE's bytes would."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def assert_bitwise(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float32))
    mismatch = bits(actual) != bits(expected)
    assert not mismatch.any(), (f"{int(mismatch.sum())} of {mismatch.numel()} differ, e.g. "
                                f"{actual.flatten()[mismatch.flatten()][:5]} vs {expected.flatten()[mismatch.flatten()][:5]}")


def test_e2m1_grid_and_every_tie():
    grid = oracle.E2M1[0]
    assert grid.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    ties = (grid[1:] + grid[:-1]) / 2
    nudged = np.concatenate([ties - 1e-6, ties + 1e-6])
    for values in (grid, ties, nudged, np.linspace(-6, 6, 4097)):
        v = np.concatenate([values, -values]).astype(np.float32)
        assert_bitwise(round_e2m1(torch.from_numpy(v)), oracle.round_to_grid(v, oracle.E2M1))
    # ties go to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert round_e2m1(torch.tensor(ties, dtype=torch.float32)).tolist() == [0, 1, 1, 2, 2, 4, 4]


def test_signed_zero_like_te():
    # TE's cast_to_fp4x2: small negatives give code 0x8 (-0.0); -0.0 itself gives code 0x0.
    out = round_e2m1(torch.tensor([-0.1, -0.0, 0.1]))
    assert bits(out).tolist() == bits(torch.tensor([-0.0, 0.0, 0.0])).tolist()


def _block_with_unit_scale(values: np.ndarray) -> np.ndarray:
    """Rows whose scaled values equal `values` exactly: another block holds amax = 2688,
    so the global scale is 1, and each block of `values` has amax 6, so its scale is 1."""
    blocks = values.reshape(-1, 16).copy()
    blocks[:, 0] = 6.0
    row = blocks.reshape(1, -1)
    return np.concatenate([np.full_like(row, 2688.0), row]).astype(np.float32)


def test_every_value_and_tie_through_the_quantizer():
    grid = oracle.E2M1[0]
    points = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2])
    values = np.concatenate([points, -points, np.zeros(-2 * len(points) % 15)])
    body = np.insert(values.reshape(-1, 15), 0, 0.0, axis=1).flatten()
    x = _block_with_unit_scale(body)
    q = quantize_nvfp4(torch.from_numpy(x))
    codes, scales, amax = oracle.nvfp4_quantize(x)
    assert_bitwise(q.codes, codes)
    assert (q.scales[1] == 1.0).all() and q.amax.item() == 2688.0
    assert_bitwise(q.codes[1], oracle.round_to_grid(x[1], oracle.E2M1))


CASES = {
    "randn": lambda g: torch.randn(32, 64, generator=g),
    "odd_shape_padding": lambda g: torch.randn(7, 37, generator=g) * 3,
    "all_zero": lambda g: torch.zeros(16, 32),
    "zero_blocks": lambda g: torch.cat([torch.zeros(8, 32), torch.randn(8, 32, generator=g)]),
    "huge": lambda g: torch.randn(16, 32, generator=g) * 1e36,
    "tiny": lambda g: torch.randn(16, 32, generator=g) * 1e-30,
    "fp32_subnormal": lambda g: torch.randn(16, 32, generator=g) * 1e-40,
    "scale_underflow": lambda g: torch.cat([torch.full((1, 32), 1e6), torch.randn(15, 32, generator=g)]),
    "mixed_magnitudes": lambda g: torch.randn(32, 48, generator=g) * torch.logspace(-8, 8, 48),
}


NOT_IN_FP16 = {"huge", "fp32_subnormal", "scale_underflow", "mixed_magnitudes"}  # overflow or flush in fp16


@pytest.mark.parametrize("case,dtype", [(c, d) for c in CASES for d in (torch.float32, torch.bfloat16, torch.float16)
                                        if not (d == torch.float16 and c in NOT_IN_FP16 or
                                                d == torch.bfloat16 and c == "fp32_subnormal")])
@pytest.mark.parametrize("tile_rows", [1, 16])
def test_quantizer_matches_oracle(case, tile_rows, dtype):
    x = CASES[case](torch.Generator().manual_seed(0)).to(dtype)
    q = quantize_nvfp4(x, tile_rows=tile_rows)
    codes, scales, amax = oracle.nvfp4_quantize(x.float().numpy(), tile_rows)
    assert_bitwise(q.codes, codes)
    assert_bitwise(q.values(), codes * scales)
    assert q.amax.item() == amax
    deq = fake_quantize(x.float(), tile=(tile_rows, 16))
    assert_bitwise(deq, oracle.nvfp4_dequantize(codes, scales, amax))
    assert fake_quantize(x, tile=(tile_rows, 16)).dtype == dtype


def test_e4m3_scales_saturate_and_underflow():
    x = torch.cat([torch.full((1, 16), 1e6), torch.full((1, 16), 1e-3), torch.full((1, 16), 50.0)])
    q = quantize_nvfp4(x)
    assert q.scales[0].item() == 448.0          # the amax block sits at the top of E4M3
    assert q.scales[1].item() == 0.0            # 1e-3 / 1e6 * 448 underflows E4M3's 2^-9
    # ... so the block is flushed to zero (TE's codes saturate at 6, times a zero scale)
    assert (q.values()[1] == 0).all() and (fake_quantize(x)[1] == 0).all()
    e4m3 = set(oracle.E4M3[0].tolist())
    assert set(q.scales.flatten().tolist()) <= e4m3


def test_non_contiguous_and_batched_inputs():
    x = torch.randn(64, 48)
    assert torch.equal(fake_quantize(x.t()), fake_quantize(x.t().contiguous()))
    x3 = torch.randn(4, 8, 32)
    assert torch.equal(fake_quantize(x3), fake_quantize(x3.reshape(32, 32)).reshape(4, 8, 32))


def test_rht_matches_float64_and_is_orthogonal():
    x = torch.randint(-64, 64, (32, 48)).float() / 16  # exactly summable: float64 == fp32 RHT
    h = oracle.hadamard16()
    assert np.allclose(h @ h.T, np.eye(16))
    expected = (x.numpy().astype(np.float64).reshape(-1, 16) @ h).reshape(32, 48)
    assert_bitwise(random_hadamard_transform(x), expected)
    deq = fake_quantize(x, rht=True)
    codes, scales, amax = oracle.nvfp4_quantize(expected.astype(np.float32))
    assert_bitwise(deq, oracle.nvfp4_dequantize(codes, scales, amax))


def test_nan_and_inf_follow_te_reference_semantics():
    x = torch.randn(16, 32)
    x[3, 5] = float("nan")
    assert torch.isnan(fake_quantize(x)).all()   # NaN amax poisons the global scale
    x[3, 5] = float("inf")
    deq = fake_quantize(x)
    assert not torch.isfinite(deq).any()         # inf amax: every dequantized value is +-inf/NaN


def test_dequantize_stays_finite_where_te_overflows():
    """amax near FLT_MAX: TE's dequantize, (scale * amax) * (1 / 2688), overflows to inf (and
    NaN for zero codes); ours multiplies amax by 1 / 2688 first there, and follows TE elsewhere."""
    x = torch.tensor([[1e36] + [1.0] * 15])
    q = quantize_nvfp4(x)
    assert torch.isinf(q.scales * q.amax).all()  # TE's first product overflows
    deq = fake_quantize(x)
    assert torch.isfinite(deq).all() and deq[0, 0] == pytest.approx(1e36, rel=0.01)
    assert (deq[0, 1:] == 0).all()  # 1.0 is below half the smallest code step of the 1e36 block
    normal = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    q = quantize_nvfp4(normal)
    te_order = q.codes * (q.scales * q.amax * (1.0 / 2688)).repeat_interleave(16, dim=1)
    assert_bitwise(q.dequantize(), te_order)  # TE's order wherever it is finite


def test_packed_bytes_round_trip_every_code():
    from nvfp4.formats import pack_e2m1, unpack_e2m1
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = torch.cat([grid, -grid]).repeat(3, 1)[:, :15]  # odd width: the last byte holds one code
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    assert packed[0, :4].tolist() == [0 | 1 << 4, 2 | 3 << 4, 4 | 5 << 4, 6 | 7 << 4]  # TE's nibble order
    assert packed[0, 4].item() == 8 | 9 << 4  # -0.0 is code 8, as TE's cast
    assert_bitwise(unpack_e2m1(packed, 15), codes)


def test_input_checks():
    with pytest.raises(TypeError):
        fake_quantize(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError):
        fake_quantize(torch.ones(4, 16), tile=(2, 16))
    with pytest.raises(ValueError):
        random_hadamard_transform(torch.ones(4, 20))


# ---- stochastic rounding --------------------------------------------------------------------

def _te_sr_formula(v: float, bits: int) -> float:
    """The issue's statement of TE's software rounder, in float64."""
    step = lambda t: 0.5 if t < 2 else (1.0 if t < 4 else 2.0)
    a = abs(v)
    t = a + bits / 256 * step(a)
    return float(np.copysign(min(np.floor(t / step(t)) * step(t), 6.0), v))


def test_stochastic_rounding_is_te_formula_for_every_bit_pattern():
    v = torch.cat([torch.linspace(-6, 6, 241), torch.tensor([0.26, 1.74, 1.76, 3.99, 5.01, -0.01])])
    for b in range(256):
        out = stochastic_round_e2m1(v, torch.full(v.shape, b, dtype=torch.uint8))
        expected = [_te_sr_formula(x, b) for x in v.tolist()]
        assert out.tolist() == expected, b


@pytest.mark.parametrize("v", [0.1, 0.3, 0.74, 1.1, 1.9, 2.2, 3.7, 4.5, 5.9, -2.6, 6.0, 1.5])
def test_stochastic_rounding_neighbours_and_mean(v):
    draws = 40000
    bits = random_bits((draws,), "cpu", torch.Generator().manual_seed(1))
    out = stochastic_round_e2m1(torch.full((draws,), v), bits).double()
    grid = np.concatenate([-oracle.E2M1[0][::-1], oracle.E2M1[0]])
    lo, hi = grid[grid <= v].max(), grid[grid >= v].min()
    assert set(out.unique().tolist()) <= {lo, hi}
    step = hi - lo
    assert abs(out.mean().item() - v) <= step / 256 + 4 * step * 0.5 / np.sqrt(draws)


def test_random_bits_are_uniform_bytes():
    bits = random_bits((256 * 4000,), "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(bits.long(), minlength=256).double()
    assert bits.dtype == torch.uint8 and len(counts) == 256
    chi2 = ((counts - 4000) ** 2 / 4000).sum().item()
    assert chi2 < 350  # 255 degrees of freedom: p ~ 1e-4


def test_stochastic_quantizer_is_unbiased_and_reproducible():
    x = torch.randn(32, 64)
    runs = [quantize_nvfp4(x, stochastic=True, generator=torch.Generator().manual_seed(i)) for i in range(400)]
    mean = torch.stack([q.dequantize() for q in runs]).mean(0)
    scale = runs[0].dequantize().abs().max()
    assert (mean - x).abs().max() < 0.05 * scale
    nearest = quantize_nvfp4(x).dequantize()
    assert ((mean - x).abs().mean() < 0.5 * (nearest - x).abs().mean())
    a = quantize_nvfp4(x, stochastic=True, generator=torch.Generator().manual_seed(7))
    b = quantize_nvfp4(x, stochastic=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.codes, b.codes)


# ---- FP8 current scaling --------------------------------------------------------------------

@pytest.mark.parametrize("fp8_dtype,grid", [(torch.float8_e4m3fn, oracle.E4M3), (torch.float8_e5m2, oracle.E5M2)])
def test_fp8_current_scaling_matches_oracle(fp8_dtype, grid):
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(32, 64, generator=g) * 5, torch.randn(8, 16, generator=g) * 1e-20, torch.zeros(4, 16)):
        q = quantize_fp8(x, fp8_dtype)
        expected, scale_inv = oracle.fp8_quantize(x.numpy(), grid, grid[0][-1])
        assert_bitwise(q.values, expected)
        assert q.scale_inv.item() == scale_inv
    assert set(q.values.abs().unique().tolist()) <= set(grid[0].tolist())


def test_fp8_grids_match_torch_dtypes():
    for fp8_dtype, grid in ((torch.float8_e4m3fn, oracle.E4M3), (torch.float8_e5m2, oracle.E5M2)):
        assert grid[0][-1] == torch.finfo(fp8_dtype).max
        t = torch.tensor(grid[0], dtype=torch.float32)
        assert torch.equal(t.to(fp8_dtype).float(), t)


# ---- Transformer Engine's reference, bit for bit ----------------------------------------------

def _te_values(ref, data, scale, rows, cols):
    codes = ref.cast_from_fp4x2(data, torch.float32)[:rows, :cols]
    return codes * scale.to(torch.float32)[:rows].repeat_interleave(16, dim=1)[:, :cols]


@pytest.mark.parametrize("shape", [(64, 128), (48, 96), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_against_te_reference(te_reference, shape, dtype):
    ref = te_reference.reference_nvfp4
    fmt = te_reference.reference_utils.Fp4Formats.E2M1
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    x[0, :16] = 0  # an all-zero block
    rows, cols = shape
    # inputs and gradients: 1x16 rowwise, RHT on the columnwise copy
    quantizer = ref.NVFP4QuantizerRef(dtype=fmt, quant_tile_shape=(1, 16), with_rht=True)
    te = quantizer.quantize(x)
    mine = quantize_nvfp4(x)
    assert_bitwise(mine.values(), _te_values(ref, te.data, te.scale, rows, cols))
    assert mine.amax.item() == te.global_amax_row.item()
    mine_t = quantize_nvfp4(random_hadamard_transform(x.t().contiguous()))
    assert_bitwise(mine_t.values(), _te_values(ref, te.data_t, te.scale_t, cols, rows))
    assert mine_t.amax.item() == te.global_amax_col.item()
    # weights: 16x16 tiles, no RHT
    quantizer = ref.NVFP4QuantizerRef(dtype=fmt, quant_tile_shape=(16, 16), with_rht=False)
    te = quantizer.quantize(x)
    mine = quantize_nvfp4(x, tile_rows=16)
    assert_bitwise(mine.values(), _te_values(ref, te.data, te.scale, rows, cols))
    assert_bitwise(mine.values().t(), _te_values(ref, te.data_t, te.scale_t, cols, rows))
