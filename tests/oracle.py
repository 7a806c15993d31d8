"""An independent NVFP4 / FP8 oracle in NumPy, written from the formats' definitions.

Grids are enumerated from sign/exponent/mantissa fields; rounding picks the nearest grid
point in float64, ties to the even mantissa. Scale arithmetic that the recipe defines in fp32
is done with NumPy float32 (IEEE single, round to nearest), step by step.
"""
import numpy as np

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)


def fp_grid(exp_bits: int, man_bits: int, bias: int, max_value: float):
    """Non-negative finite values and mantissa parity of a small float format."""
    values, odd = [], []
    for e in range(2 ** exp_bits):
        for m in range(2 ** man_bits):
            v = (m / 2 ** man_bits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2 ** man_bits) * 2.0 ** (e - bias)
            if v <= max_value:
                values.append(v)
                odd.append(m % 2)
    order = np.argsort(values)
    return np.array(values)[order], np.array(odd)[order]


E2M1 = fp_grid(2, 1, 1, 6.0)        # 0, .5, 1, 1.5, 2, 3, 4, 6
E4M3 = fp_grid(4, 3, 7, 448.0)      # E4M3FN: 448 is the largest finite value
E5M2 = fp_grid(5, 2, 15, 57344.0)


def round_to_grid(x, grid, saturate=True):
    """Round to nearest on a symmetric grid, ties to even mantissa (float64)."""
    values, odd = grid
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    if saturate:
        a = np.minimum(a, values[-1])
    hi = np.clip(np.searchsorted(values, a), 0, len(values) - 1)
    lo = np.clip(hi - 1, 0, len(values) - 1)
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (odd[hi] == 0))
    q = np.where(pick_hi, values[hi], values[lo])
    return np.where(x < 0, -q, q)


def nvfp4_quantize(x, tile_rows=1):
    """NVFP4 per the recipe: returns (codes, block scales per element, amax), all float64."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    pad_r, pad_c = -rows % tile_rows, -cols % 16
    xp = np.pad(x, ((0, pad_r), (0, pad_c)))
    amax = F32(np.max(np.abs(x))) if x.size else F32(0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        g_enc = min(F32(F32(2688.0) / amax), FLT_MAX)
        g_enc = F32(1.0) if g_enc == 0 else F32(g_enc)
        g_dec = F32(F32(1.0) / g_enc)
        mult = F32(g_enc * F32(1.0 / 6.0))
        blocks = np.abs(xp).reshape(xp.shape[0], -1, 16).max(-1)
        if tile_rows > 1:
            blocks = blocks.reshape(-1, tile_rows, blocks.shape[1]).max(1).repeat(tile_rows, 0)
        dec = np.minimum((blocks.astype(F32) * mult).astype(F32), FLT_MAX)
        scales = round_to_grid(np.clip(dec, -448, 448), E4M3).astype(F32)
        enc = np.minimum((F32(1.0) / (scales * g_dec).astype(F32)).astype(F32), FLT_MAX)
        scaled = np.clip((xp.reshape(xp.shape[0], -1, 16) * enc[..., None]).astype(F32), -6, 6)
    codes = round_to_grid(scaled, E2M1).reshape(xp.shape)[:rows, :cols]
    scale_per_elem = np.repeat(scales, 16, axis=1)[:rows, :cols]
    return codes, scale_per_elem.astype(np.float64), amax


def nvfp4_dequantize(codes, scales, amax):
    """TE's dequantize kernel: code * (scale * amax * fp32(1/2688)), in fp32; where scale * amax
    overflows (TE's kernel: inf), scale * (amax * fp32(1/2688)) instead."""
    with np.errstate(over="ignore", invalid="ignore"):
        product = (scales.astype(F32) * F32(amax)).astype(F32)
        final = (product * F32(1.0 / 2688.0)).astype(F32)
        finite = (scales.astype(F32) * (F32(amax) * F32(1.0 / 2688.0)).astype(F32)).astype(F32)
    final = np.where(np.isinf(product) & np.isfinite(amax), finite, final)
    return (codes.astype(F32) * final).astype(F32)


def hadamard16():
    signs = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=np.float64)
    h = np.array([[(-1) ** bin(i & j).count("1") for j in range(16)] for i in range(16)], dtype=np.float64)
    return signs[:, None] * h / 4.0


def fp8_quantize(x, grid, fp8_max):
    """TE's current scaling: scale = max / amax (amax 0 -> 1), q = round(x * scale)."""
    x = np.asarray(x, dtype=np.float32)
    amax = F32(np.max(np.abs(x)))
    with np.errstate(divide="ignore"):
        scale = F32(F32(fp8_max) / amax)
    scale = F32(1.0) if amax == 0 else scale
    q = round_to_grid((x * scale).astype(F32), grid)
    return q, F32(F32(1.0) / scale)
