"""Fused Triton kernels for NVFP4 (and FP8) on GPUs, bitwise equal to formats.quantize_nvfp4
(formats.quantize_fp8).

The op `quantize` reads a GEMM operand twice. The amax kernel reads it once for both global
amaxes (of the operand, and of RHT(operand^T) for the wgrad copy). The quantize kernel reads
each [16, 128] tile once (64 wide where 128 does not divide the width), computes its 1x16 (or
16x16) block amaxes, rounds the E4M3 block scales, scales, rounds to E2M1 (to nearest even, or
stochastically) and writes up to two copies: rowwise, and columnwise, where blocks run 16 down a
column, i.e. the 1x16 blocks of the transpose, handled on the tile's transpose (RHT: one
[BLOCK_C, 16] @ [16, 16] dot), so that each block's scale is computed by few threads. Each copy
is written in one or both of two forms: the exact GEMM operand values (code x scale, bf16, in the
operand's layout for both copies: a GEMM takes the columnwise one transposed), for copies a GEMM
consumes at once; and TE's bytes (E2M1 codes two a byte, E4M3 scale bytes; the columnwise copy in
TE's transposed layout), for copies kept for backward, which `unpack` expands once before their
GEMM. No transposed copy of the operand, no cuBLAS matmul with a 16x16 matrix.

The kernel does little arithmetic per byte and is bound by instruction issue, mostly of the
integer/logic pipe, which runs at half the FMA pipe's rate; so the rounding uses bit operations
and FMAs where compares and selects would do, block scales round through the hardware's E4M3
conversion, and 3-D reshapes of the dot's output (which move data through shared memory) are
avoided.

Exactness: every step is the fp32 operation of formats.quantize_nvfp4 (IEEE division via
div_rn; divisions by powers of two are exact multiplications), and round-to-nearest-even is the
(y + c) - c identity, c = 2^23 times the grid spacing (stochastic rounding's floor: the same with
the add rounded toward zero). The RHT sums 16 exact products in fp32, as TE's own RHT kernel does
on tensor cores; its summation order, like any GEMM's, is the implementation's (the reference's
torch.matmul has its own). tests/test_kernels.py checks the kernels on the GPU and through
Triton's CPU interpreter (which truncates float conversions: there the roundings are spelled out
in bits).

Stochastic rounding draws its 8 bits per element in the kernel (Philox, from a seed tensor drawn
from torch's generator; the columnwise copy from seed + 1), so no random tensor is
materialized; `launch_quantize` also takes explicit bits, which is how the tests compare it with the
reference bit for bit.

`scaled_mm` is the GEMM of fprop and dgrad with TE's epilogue fused: alpha from the two global
amaxes, the bias, one rounding to the output dtype, so the fp32 product never goes to memory. It
multiplies exact 16-bit operand values (NVFP4: the values copies; emulated FP8: the FP8 values).
`quantize_fp8` is TE's current scaling in two reads (amax, then one kernel writing the FP8 copy
and its transpose).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .formats import E4M3_MAXES, PACKED, RHT_SIGNS, VALUES, alpha_denom, dequant_factor

INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)  # as triton.jit reads it (TRITON_INTERPRET=1)

FLT_MAX = tl.constexpr(3.4028234663852886e38)
RECIP_6 = tl.constexpr(0.1666666716337204)  # torch.reciprocal(6.0) in fp32, as TE's reference multiplies by it
DEQUANT_FACTOR_448 = tl.constexpr(dequant_factor(448))  # 1 / (6 * 448) in fp32 (TE's dequantize)
DEQUANT_FACTOR_256 = tl.constexpr(dequant_factor(256))
RNE_MAGIC = tl.constexpr(8388608.0)  # 2^23
HALF_RNE_MAGIC = tl.constexpr(4194304.0)  # 2^22
EXPONENT_BITS = tl.constexpr(-8388608)  # 0xFF800000: sign and exponent of an fp32
ONE_MANTISSA_BIT = tl.constexpr(-4194304)  # 0xFFC00000: ... and the top mantissa bit
SIGN_BIT = tl.constexpr(-2147483648)  # 0x80000000
ONE_BITS = tl.constexpr(0x3F800000)  # 1.0
PHILOX_2X32_M, PHILOX_W = tl.constexpr(0xD256D193), tl.constexpr(0x9E3779B9)  # Random123's Philox-2x32 constants
RHT_NEGATIVE_ROWS = tl.constexpr(sum(1 << i for i, s in enumerate(RHT_SIGNS) if s < 0))
# where stochastic rounding takes its bits from: none (round to nearest), a bits tensor, a seed
NO_RANDOM, RANDOM_BITS, RANDOM_SEED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# 4over6 candidate selection: off, or by which error (formats.FOUR_OVER_SIX_ERR_MODES)
NO_FOUR_OVER_SIX, FOUR_OVER_SIX_MAE, FOUR_OVER_SIX_MSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FOUR_OVER_SIX_MODES = {None: 0, "MAE": 1, "MSE": 2}


@triton.jit
def _round_half_even(y):
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def _truncate(a, keep_bits):
    """a with its fp32 bits ANDed with keep_bits: rounds a >= 0 down to fewer mantissa bits."""
    return (a.to(tl.int32, bitcast=True) & keep_bits).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_step(a):
    """Spacing of the E2M1 grid at a in [0, 8): 0.5 below 2, 1 below 4, else 2, i.e. half the
    power of two at or below max(a, 1). Bit operations instead of selects, which would take
    more of the integer/logic pipe (see the module docstring)."""
    return _truncate(tl.maximum(a, 1.0), EXPONENT_BITS) * 0.5


@triton.jit
def _round_e2m1(a):
    """a in [0, 6] to the nearest E2M1 value, ties to even: (a + c) - c rounds to a multiple of
    c's ulp, which is the grid spacing when c = 2^23 * step(a)."""
    c = _truncate(tl.maximum(a, 1.0), EXPONENT_BITS) * HALF_RNE_MAGIC  # 2^23 * step(a)
    return (a + c) - c


@triton.jit
def _floor_e2m1(t):
    """t in [0, 8) down to the E2M1 grid (6 at most): (t + c) - c with the add rounded toward
    zero, c = 2^23 * step(t), whose ulp is the grid spacing at t (the compares and selects of the
    interpreter's version would take more of the integer/logic pipe)."""
    if INTERPRETED:  # the top mantissa bit from 1 up, else 0.5 or 0
        return tl.where(t >= 1.0, _truncate(t, ONE_MANTISSA_BIT), tl.where(t >= 0.5, 0.5, 0.0))
    c = _truncate(tl.maximum(t, 1.0), EXPONENT_BITS) * HALF_RNE_MAGIC
    return tl.inline_asm_elementwise("add.rz.f32 $0, $1, $2;", "=f,f,f", [t, c], dtype=tl.float32,
                                     is_pure=True, pack=1) - c


@triton.jit
def _round_e4m3(s):
    """Non-negative fp32 (<= 448) to the nearest E4M3 value, ties to even, subnormals at 2^-9."""
    exponent = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv_quantum = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(s * inv_quantum) * quantum


@triton.jit
def _round_to_bf16(y):
    """fp32 to the nearest bf16 value, ties to even, NaN kept, back in fp32: the GPU's paired
    conversion (one instruction for two values, where Triton would convert them one at a time
    on the conversion pipe), spelled out under Triton's CPU interpreter, which truncates instead."""
    if INTERPRETED:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
        "=f,=f,f,f", [y], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _hadamard16(dtype: tl.constexpr):
    """TE's RHT matrix diag(signs) @ Sylvester H16 / 4, where H16[i, j] = (-1)^popcount(i & j),
    in dtype (+-1/4 is exact in every float type)."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    both = i & j
    negative = (both ^ (both >> 1) ^ (both >> 2) ^ (both >> 3) ^ (RHT_NEGATIVE_ROWS >> i)) & 1
    return tl.where(negative != 0, -0.25, 0.25).to(dtype)


@triton.jit
def _rht_rows(xt):
    """The 16-point RHT along each row of a [R, 16] tile xt (x^T's rows: 16 tokens; or of each
    tile of a batch [G, R, 16]), in fp32:
    16 exact products summed (16-bit inputs: tensor cores in their dtype, which holds +-1/4,
    with fp32 accumulation; fp32, and the interpreter, which rounds 16-bit products: IEEE FMAs).
    TE's reference transforms in x's dtype: round with _round_to(y, xt.dtype)."""
    h = _hadamard16(tl.float32 if xt.dtype == tl.float32 or INTERPRETED else xt.dtype)
    if len(xt.shape) == 3:  # a batch of tiles [G, R, 16]
        h = tl.broadcast_to(h[None, :, :], (xt.shape[0], 16, 16))
    if xt.dtype == tl.float32 or INTERPRETED:
        return tl.dot(xt.to(tl.float32), h, input_precision="ieee")
    return tl.dot(xt, h, out_dtype=tl.float32)


@triton.jit
def _round_to(y, dtype: tl.constexpr):
    """fp32 y rounded to dtype (to nearest even), back in fp32. Monotonic, so it commutes with max |.|."""
    if dtype == tl.bfloat16:
        return _round_to_bf16(y)
    return y.to(dtype).to(tl.float32)


@triton.jit
def _philox2x32(c0, c1, key):
    """Philox-2x32-10 (Salmon et al., SC'11; Random123's constants) of the counters (c0, c1) under
    a 32-bit key: two uniform 32-bit words."""
    for _ in tl.static_range(10):
        hi = tl.umulhi(c0, PHILOX_2X32_M)
        c0, c1 = hi ^ key ^ c1, c0 * PHILOX_2X32_M
        key = key + PHILOX_W
    return c0, c1


@triton.jit
def _bytes_uniform(words, WIDTH: tl.constexpr):
    """[rows, n, 4 * k] bytes of the words [rows, n, k] as u = byte / 256: each byte is put at the
    top of 1.0's mantissa (1 + byte / 256, exact), which spares an integer-to-float conversion."""
    rows: tl.constexpr = words.shape[0]
    shift = tl.arange(0, 4)[None, None, None, :] * 8
    k = tl.reshape((words[:, :, :, None] >> shift) & 0xFF, (rows, WIDTH))
    return ((k << 15) | ONE_BITS).to(tl.float32, bitcast=True) - 1.0


@triton.jit
def _random_uniform(seed, first_counter, WIDTH: tl.constexpr, GROUP: tl.constexpr):
    """u = k / 256 for a uniform random byte k per element of a [len(first_counter), WIDTH] tile:
    one Philox call per GROUP neighbours in a row, counted on from the row's first_counter:
    Philox-2x32 (8 bytes) for GROUP 8, a thread's 16-byte vector of bf16, so that no two threads
    compute one call; Philox-4x32 (16 bytes) for GROUP 16."""
    rows: tl.constexpr = first_counter.shape[0]
    counter = first_counter[:, None] + tl.arange(0, WIDTH // GROUP)[None, :]
    if GROUP == 8:
        w0, w1 = _philox2x32(counter.to(tl.uint32), tl.zeros(counter.shape, tl.uint32), seed.to(tl.uint32))
        words = tl.reshape(tl.join(w0, w1), (rows, WIDTH // 8, 2))
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, counter)
        words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (rows, WIDTH // 16, 4))
    return _bytes_uniform(words, WIDTH)


@triton.jit
def _global_scales(amax, E4M3_MAX: tl.constexpr):
    """TE's global encode scale 6 * E4M3_MAX / amax (at most FLT_MAX; 0, i.e. amax = inf, -> 1)
    and its decode scale 1 / encode."""
    g_enc = tl.minimum(tl.math.div_rn(tl.full(amax.shape, 6.0 * E4M3_MAX, tl.float32), amax), FLT_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
    g_enc = tl.where(g_enc == 0.0, 1.0, g_enc)
    return g_enc, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), g_enc)


@triton.jit
def _encode(scale, g_dec):
    """fp32 encode scale of a block with E4M3 decode scale `scale`: min(1 / (scale * g_dec), FLT_MAX)."""
    return tl.minimum(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale * g_dec), FLT_MAX,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _to_e4m3(decode):
    """(E4M3 value in fp32, its float8_e4m3fn byte) of non-negative block decode scales: clamped
    to 448 and rounded to nearest even, subnormals at 2^-9, NaN kept (byte 0x7F). On the GPU one
    conversion instruction per two scales; Triton's interpreter truncates, so it rounds by bits."""
    decode = tl.minimum(decode, 448.0, propagate_nan=tl.PropagateNan.ALL)
    if INTERPRETED:
        scale = _round_e4m3(decode)
        return scale, _e4m3_byte(scale)
    fp8 = decode.to(tl.float8e4nv)
    return fp8.to(tl.float32), fp8.to(tl.uint8, bitcast=True)


@triton.jit
def _block_scales(block_amax, amax):
    """(E4M3 decode scale, its byte, fp32 encode scale) of blocks with `block_amax` in a tensor of
    global `amax` (the standard path: decode = block_amax * (g_enc * fp32(1/6)), at most 448)."""
    g_enc, g_dec = _global_scales(amax, 448)
    scale, byte = _to_e4m3(block_amax * (g_enc * RECIP_6))
    return scale, byte, _encode(scale, g_dec)


@triton.jit
def _sum16_in_order(e):
    """e[:, 0] + e[:, 1] + ... + e[:, 15] from left to right, as TE's reference loop adds a
    block's errors (a tree would round differently): the columns taken apart with splits."""
    N: tl.constexpr = e.shape[0]
    even, odd = tl.split(tl.reshape(e, (N, 8, 2)))  # e[:, 2k], e[:, 2k + 1]
    q0, q2 = tl.split(tl.reshape(even, (N, 4, 2)))  # e[:, 4k], e[:, 4k + 2]
    q1, q3 = tl.split(tl.reshape(odd, (N, 4, 2)))   # e[:, 4k + 1], e[:, 4k + 3]
    a0, a1, a2, a3 = _columns4(q0)
    b0, b1, b2, b3 = _columns4(q1)
    c0, c1, c2, c3 = _columns4(q2)
    d0, d1, d2, d3 = _columns4(q3)
    return a0 + b0 + c0 + d0 + a1 + b1 + c1 + d1 + a2 + b2 + c2 + d2 + a3 + b3 + c3 + d3


@triton.jit
def _columns4(t):
    """The four columns of an [N, 4] tile."""
    N: tl.constexpr = t.shape[0]
    even, odd = tl.split(tl.reshape(t, (N, 2, 2)))  # t[:, 0::2], t[:, 1::2]
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _candidate_error(values, blocks, amax, ERR_MSE: tl.constexpr, E4M3_MAX: tl.constexpr, FAST: tl.constexpr):
    """Per block of `blocks` ([N, 16]), the error TE's 4over6 reference gives a candidate of
    `values` (code * scale): the in-order sum of |v - x| (MAE) or (v - x)^2 (MSE), where
    v = (values * amax) / (6 * E4M3_MAX); FAST: that division as _div_by_constant's."""
    if FAST:
        v = _div_by_constant(values * amax, 6.0 * E4M3_MAX)
    else:
        v = tl.math.div_rn(values * amax, tl.full(values.shape, 6.0 * E4M3_MAX, tl.float32))
    diff = v - blocks
    return _sum16_in_order(diff * diff if ERR_MSE else tl.abs(diff))


@triton.jit
def _div_by_constant(a, K: tl.constexpr):
    """a / K rounded to nearest for K = 2688 or 1536 (6 x 448, 6 x 256) and a = 0 or 2^-80 <= |a|
    <= 2^80: q = RN(a * RN(1/K)), then one correction with the exact remainder a - q * K (an FMA):
    Markstein's division by a known divisor (Handbook of Floating-Point Arithmetic, 4.7), three
    instructions for the IEEE division's ten and its range check. Exact for every fp32 a there
    (tests/test_kernels.py checks all 2^23 significands; a scaled by 2^k scales every step), but
    for the sign of a zero, which |v - x| and (v - x)^2 do not see."""
    recip: tl.constexpr = 1.0 / K  # K's reciprocal, rounded to fp32 where it meets a
    q = a * recip
    return tl.fma(tl.fma(-q, K, a), recip, q)


@triton.jit
def _sum_tile_rows(err):
    """The 16 rows of [16, NB] block errors added in TE's warp-reduction order (8, 4, 2, 1 apart;
    a sum of two is exact in either order): [1, NB]."""
    NB: tl.constexpr = err.shape[1]
    err = tl.sum(tl.reshape(err, (2, 8, NB)), axis=0)
    err = tl.sum(tl.reshape(err, (2, 4, NB)), axis=0)
    err = tl.sum(tl.reshape(err, (2, 2, NB)), axis=0)
    return tl.sum(tl.reshape(err, (2, 1, NB)), axis=0)


@triton.jit
def _four_over_six(blocks, block_amax, amax, ERR_MSE: tl.constexpr, E4M3_MAX: tl.constexpr,
                   TILE_ROWS: tl.constexpr, ZERO_SIGN: tl.constexpr):
    """(codes, scale, scale byte) of 4over6 for blocks [R, NB, 16] (TILE_ROWS=16: one 16x16 tile per NB
    column, R = 16): map-to-6 scales by base = (block_amax / 6) * g_enc, map-to-4 by 1.5 * base;
    map-to-4 is kept only where its error is smaller (formats._four_over_six)."""
    R: tl.constexpr = blocks.shape[0]
    NB: tl.constexpr = blocks.shape[1]
    g_enc, g_dec = _global_scales(amax, E4M3_MAX)
    base = tl.math.div_rn(block_amax, tl.full(block_amax.shape, 6.0, tl.float32)) * g_enc
    scale4, byte4 = _to_e4m3(base * 1.5)
    scale6, byte6 = _to_e4m3(base)
    zero = tl.zeros(blocks.shape, tl.float32)
    codes4 = _round_blocks(blocks, _encode(scale4, g_dec), zero, NO_RANDOM, ZERO_SIGN)
    codes6 = _round_blocks(blocks, _encode(scale6, g_dec), zero, NO_RANDOM, ZERO_SIGN)
    flat = tl.reshape(blocks, (R * NB, 16))
    amax16 = tl.reshape(tl.broadcast_to(amax, (R, NB, 16)), (R * NB, 16))
    values4 = tl.reshape(codes4 * scale4, (R * NB, 16))
    values6 = tl.reshape(codes6 * scale6, (R * NB, 16))
    # the fast division where it is exact: |values * amax| is 0 or in [2^-10 amax, 2688 amax]
    in_range = tl.min(tl.where((amax16 >= 2.0 ** -64) & (amax16 <= 2.0 ** 64), 1, 0))
    if (in_range == 1) and not INTERPRETED:  # (the interpreter's fma rounds twice)
        err4 = _candidate_error(values4, flat, amax16, ERR_MSE, E4M3_MAX, True)
        err6 = _candidate_error(values6, flat, amax16, ERR_MSE, E4M3_MAX, True)
    else:
        err4 = _candidate_error(values4, flat, amax16, ERR_MSE, E4M3_MAX, False)
        err6 = _candidate_error(values6, flat, amax16, ERR_MSE, E4M3_MAX, False)
    if TILE_ROWS == 16:
        pick4 = tl.reshape(_sum_tile_rows(tl.reshape(err4, (R, NB))) < _sum_tile_rows(tl.reshape(err6, (R, NB))),
                           (1, NB, 1))
    else:
        pick4 = tl.reshape(err4 < err6, (R, NB, 1))
    return tl.where(pick4, codes4, codes6), tl.where(pick4, scale4, scale6), tl.where(pick4, byte4, byte6)


@triton.jit
def _dequant_scale(scale, amax, E4M3_MAX: tl.constexpr):
    """TE's dequantize factor (scale * amax) * fp32(1 / (6 * E4M3_MAX)); where scale * amax
    overflows, scale * (amax * that constant) (formats.dequant_scale)."""
    if E4M3_MAX == 448:
        factor = DEQUANT_FACTOR_448
    else:
        factor = DEQUANT_FACTOR_256
    product = scale * amax
    overflow = tl.where(amax <= FLT_MAX, product > FLT_MAX, False)
    return tl.where(overflow, scale * (amax * factor), product * factor)


@triton.jit
def _round_blocks(blocks, encode, u, RANDOM: tl.constexpr, ZERO_SIGN: tl.constexpr):
    """Signed E2M1 codes of fp32 `blocks` (encode broadcast to blocks' shape); u: uniform
    k / 256 per element for stochastic rounding, unused otherwise. ZERO_SIGN: the sign of a zero
    code as the reference's (v < 0: -0.0 from a negative value, +0.0 from -0.0), which TE's
    bytes keep; otherwise v's sign bit (GEMM values: zeros of either sign multiply alike)."""
    v = blocks * encode
    # |clamp(v, -6, 6)|; min drops a NaN, but x holds a NaN only where its amax, and so every
    # scale, is NaN (TE's reference: the whole tensor is NaN)
    a = tl.minimum(tl.abs(v), 6.0)
    if RANDOM == NO_RANDOM:
        q = _round_e2m1(a)
    else:  # TE's software rounder: t = |x| + u * step(|x|), floor to the grid at t (t < 8)
        q = _floor_e2m1(a + u * _e2m1_step(a))
    # v's sign back on q; v + 0.0 turns -0.0 into +0.0, as the reference's v < 0 test does
    sign = ((v + 0.0) if ZERO_SIGN else v).to(tl.int32, bitcast=True) & SIGN_BIT
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_blocks(blocks, block_amax, amax, u, RANDOM: tl.constexpr, FOUR_OVER_SIX: tl.constexpr,
                     E4M3_MAX: tl.constexpr, TILE_ROWS: tl.constexpr, ZERO_SIGN: tl.constexpr):
    """(signed codes, E4M3 scales, their bytes) of fp32 blocks [R, NB, 16] in a tensor (or row) of `amax`."""
    if FOUR_OVER_SIX != NO_FOUR_OVER_SIX:
        codes, scale, byte = _four_over_six(blocks, block_amax, amax, FOUR_OVER_SIX == FOUR_OVER_SIX_MSE,
                                            E4M3_MAX, TILE_ROWS, ZERO_SIGN)
    else:
        scale, byte, encode = _block_scales(block_amax, amax)
        codes = _round_blocks(blocks, encode, u, RANDOM, ZERO_SIGN)
    return codes, scale, byte


@triton.jit
def _uniform(bits_ptr, seed_ptr, seed_offset, offsets, first_counter, mask, RANDOM: tl.constexpr,
             GROUP: tl.constexpr):
    """u = bits / 256 for 8 random bits per element of the tile at `offsets`, for stochastic
    rounding: explicit (RANDOM_BITS) or drawn from the seed (each copy its own Philox key: seed +
    seed_offset; counters from first_counter, one per GROUP elements, see _random_uniform); zeros
    when rounding to nearest."""
    if RANDOM == RANDOM_BITS:
        u = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.float32) * (1.0 / 256.0)
    elif RANDOM == RANDOM_SEED:
        u = _random_uniform(tl.load(seed_ptr) + seed_offset, first_counter, offsets.shape[1], GROUP)
    else:
        u = tl.zeros(offsets.shape, tl.float32)
    return u


@triton.jit
def _nibbles(codes, scale):
    """TE's 4-bit E2M1 codes (formats.pack_e2m1) of signed E2M1 values: the magnitude's index
    on the grid 0, 0.5, 1, 1.5, 2, 3, 4, 6 plus 8 for a set sign bit; 0 in blocks whose scale is
    NaN (the reference's codes there are NaN, which TE's cast writes as 0). code * 2^-14 is an
    fp16 whose bits 9-11 hold the index and bit 15 the sign (the E2M1 subnormal 0.5 lands on
    fp16's subnormal 2^-15), so one exact conversion and two shifts find the code."""
    half = (codes * 6.103515625e-05).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    nibble = ((half >> 9) & 7) | ((half >> 12) & 8)
    return tl.where(scale != scale, 0, nibble)


@triton.jit
def _pack_pairs(nibbles):
    """[R, C] nibbles -> [R, C // 2] bytes, the even column in the low nibble (TE's order)."""
    R: tl.constexpr = nibbles.shape[0]
    C: tl.constexpr = nibbles.shape[1]
    low, high = tl.split(tl.reshape(nibbles, (R, C // 2, 2)))
    return (low | (high << 4)).to(tl.uint8)


@triton.jit
def _e4m3_byte(scale):
    """The float8_e4m3fn bits of a non-negative E4M3 value held in fp32 (NaN: 0x7F)."""
    bits = scale.to(tl.int32, bitcast=True)
    normal = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)  # exponent bias 127 -> 7
    subnormal = (scale * 512.0).to(tl.int32)  # multiples of 2^-9 below 2^-6
    return tl.where(scale != scale, 0x7F, tl.where(scale < 0.015625, subnormal, normal)).to(tl.uint8)


@triton.jit
def _store_te_bytes(data_ptr, scale_ptr, stored_rows, row_mask, first_block, row_blocks, codes, scale, byte):
    """Blocks of signed E2M1 codes [R, NB, 16] with their E4M3 scales and scale bytes [R, NB, 1]
    into TE's layout: block b of stored row s as 8 bytes at data_ptr + (s * row_blocks + b) * 8
    and one scale byte at scale_ptr + s * row_blocks + b, for the NB blocks from first_block of
    the rows stored_rows (where row_mask holds and b < row_blocks)."""
    R: tl.constexpr = codes.shape[0]
    NB: tl.constexpr = codes.shape[1]
    data = _pack_pairs(tl.reshape(_nibbles(codes, scale), (R, NB * 16)))
    column = first_block * 8 + tl.arange(0, NB * 8)
    tl.store(data_ptr + stored_rows[:, None] * (row_blocks * 8) + column[None, :], data,
             mask=row_mask[:, None] & (column[None, :] < row_blocks * 8))
    block = first_block + tl.arange(0, NB)
    tl.store(scale_ptr + stored_rows[:, None] * row_blocks + block[None, :], tl.reshape(byte, (R, NB)),
             mask=row_mask[:, None] & (block[None, :] < row_blocks))


@triton.jit
def _row_copy(x, r, c0, rows, cols, amax_ptr, bits_ptr, seed_ptr, offsets, mask, RANDOM: tl.constexpr,
              FOUR_OVER_SIX: tl.constexpr, E4M3_MAX: tl.constexpr, ROW_SCALED: tl.constexpr,
              TILE_ROWS: tl.constexpr, ZERO_SIGN: tl.constexpr):
    """The rowwise copy of the [16, BLOCK_C] tile x (rows r, from column c0): (codes [16, NB, 16],
    scales and scale bytes [16, NB, 1], amax broadcast to the tile's blocks) of its 1x16 blocks
    (TILE_ROWS=16: one 16x16 tile per NB column)."""
    NB: tl.constexpr = x.shape[1] // 16
    blocks = tl.reshape(x.to(tl.float32), (16, NB, 16))
    block_amax = tl.max(tl.abs(blocks), axis=2, keep_dims=True)
    if TILE_ROWS == 16:  # 16x16 tiles: one amax for the tile's 16 rows
        block_amax = tl.max(block_amax, axis=0, keep_dims=True)
    if ROW_SCALED:
        amax = tl.reshape(tl.load(amax_ptr + r, mask=r < rows, other=0.0), (16, 1, 1))
    else:
        amax = tl.load(amax_ptr)
    u = tl.reshape(_uniform(bits_ptr, seed_ptr, 0, offsets, (r * cols + c0) // 8, mask, RANDOM, 8), blocks.shape)
    codes, scale, byte = _quantize_blocks(blocks, block_amax, amax, u, RANDOM, FOUR_OVER_SIX, E4M3_MAX, TILE_ROWS,
                                          ZERO_SIGN)
    return codes, tl.broadcast_to(scale, (16, NB, 1)), tl.broadcast_to(byte, (16, NB, 1)), amax


@triton.jit
def _row(x_ptr, k, c, rows, cols):
    """Row k of x at columns c, in fp32 (0 outside x)."""
    return tl.load(x_ptr + k * cols + c, mask=(k < rows) & (c < cols), other=0.0).to(tl.float32)


@triton.jit
def _blocks_down_columns(x_ptr, c, rows, cols):
    """x^T's tile [BLOCK_C, 16] (fp32) of this program's 16 rows and the columns c of x, each block
    (a column of the tile) held by one thread: the 16 rows loaded one by one (again: the tile's
    first read left them in L1) and joined, so that a block's in-order sums and scales take no data
    from other threads. (tl.trans of the tile leaves each thread 2 values of 8 blocks, and 4over6's
    per-block work then runs 8 times a thread.) Joins put the new dimension last: pairing rows
    k and k + 8, then k and k + 4, k + 2, k + 1 lays the 16 out in order."""
    BLOCK_C: tl.constexpr = c.shape[0]
    r0 = tl.program_id(0) * 16
    j0 = tl.join(_row(x_ptr, r0 + 0, c, rows, cols), _row(x_ptr, r0 + 8, c, rows, cols))
    j1 = tl.join(_row(x_ptr, r0 + 1, c, rows, cols), _row(x_ptr, r0 + 9, c, rows, cols))
    j2 = tl.join(_row(x_ptr, r0 + 2, c, rows, cols), _row(x_ptr, r0 + 10, c, rows, cols))
    j3 = tl.join(_row(x_ptr, r0 + 3, c, rows, cols), _row(x_ptr, r0 + 11, c, rows, cols))
    j4 = tl.join(_row(x_ptr, r0 + 4, c, rows, cols), _row(x_ptr, r0 + 12, c, rows, cols))
    j5 = tl.join(_row(x_ptr, r0 + 5, c, rows, cols), _row(x_ptr, r0 + 13, c, rows, cols))
    j6 = tl.join(_row(x_ptr, r0 + 6, c, rows, cols), _row(x_ptr, r0 + 14, c, rows, cols))
    j7 = tl.join(_row(x_ptr, r0 + 7, c, rows, cols), _row(x_ptr, r0 + 15, c, rows, cols))
    q0, q1, q2, q3 = tl.join(j0, j4), tl.join(j1, j5), tl.join(j2, j6), tl.join(j3, j7)
    return tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), (BLOCK_C, 16))


@triton.jit
def _column_copy(x, x_ptr, r, c, rows, cols, amax_ptr, bits_ptr, seed_ptr, offsets, mask, RHT: tl.constexpr,
                 RANDOM: tl.constexpr, FOUR_OVER_SIX: tl.constexpr, E4M3_MAX: tl.constexpr,
                 ROW_SCALED: tl.constexpr, ZERO_SIGN: tl.constexpr):
    """The columnwise copy of the [16, BLOCK_C] tile x: (codes [BLOCK_C, 16], scales and scale
    bytes [BLOCK_C, 1]) of the blocks of 16 down its columns, i.e. of x^T's tile [BLOCK_C, 16],
    whose rows are the blocks (RHT: of RHT(x^T), one [BLOCK_C, 16] @ [16, 16] dot)."""
    BLOCK_C: tl.constexpr = x.shape[1]
    xt = tl.trans(x)
    blocks = _round_to(_rht_rows(xt), xt.dtype) if RHT else xt.to(tl.float32)
    block_amax = tl.max(tl.abs(blocks), axis=1, keep_dims=True)
    if ROW_SCALED:
        amax = tl.load(amax_ptr + rows + c, mask=c < cols, other=0.0)[:, None]
    else:
        amax = tl.load(amax_ptr + 1)
    u = _uniform(bits_ptr, seed_ptr, 1, tl.trans(offsets), tl.program_id(0) * cols + c, tl.trans(mask), RANDOM, 16)
    if FOUR_OVER_SIX != NO_FOUR_OVER_SIX:  # on [BLOCK_C, 1, 16], the rowwise layout of blocks
        tl.static_assert(not RHT, "4over6 copies take no RHT (TE: nvfp4_4over6 needs disable_rht)")
        blocks = _blocks_down_columns(x_ptr, c, rows, cols)
        block_amax = tl.max(tl.abs(blocks), axis=1, keep_dims=True)
        codes, scale, byte = _four_over_six(
            tl.reshape(blocks, (BLOCK_C, 1, 16)), tl.reshape(block_amax, (BLOCK_C, 1, 1)),
            amax if not ROW_SCALED else tl.reshape(amax, (BLOCK_C, 1, 1)), FOUR_OVER_SIX == FOUR_OVER_SIX_MSE,
            E4M3_MAX, 1, ZERO_SIGN)
        return tl.reshape(codes, (BLOCK_C, 16)), tl.reshape(scale, (BLOCK_C, 1)), tl.reshape(byte, (BLOCK_C, 1))
    scale, byte, encode = _block_scales(block_amax, amax)
    return _round_blocks(blocks, encode, u, RANDOM, ZERO_SIGN), scale, byte


@triton.jit
def _quantize_kernel(x_ptr, amax_ptr, bits_ptr, seed_ptr, row_values_ptr, row_data_ptr, row_scale_ptr,
                     col_values_ptr, col_data_ptr, col_scale_ptr, deq_out_ptr, rows, cols,
                     ROW_VALUES: tl.constexpr, ROW_PACKED: tl.constexpr, COL_VALUES: tl.constexpr,
                     COL_PACKED: tl.constexpr, RHT: tl.constexpr, TILE_ROWS: tl.constexpr, RANDOM: tl.constexpr,
                     FOUR_OVER_SIX: tl.constexpr, E4M3_MAX: tl.constexpr, ROW_SCALED: tl.constexpr,
                     DEQUANT: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """One read of a [16, BLOCK_C] tile of x, up to two quantized copies, each in up to two forms.
    Rowwise: blocks of 16 along rows (TILE_ROWS=16: 16x16 tiles). Columnwise: blocks of 16 down
    columns, i.e. x^T's 1x16 blocks (RHT: of RHT(x^T)). Forms: *_VALUES, the exact GEMM operand
    code * E4M3 scale in the values tensor's dtype (bf16 holds it exactly), in x's layout for both
    copies (a GEMM takes the columnwise one transposed); *_PACKED, TE's bytes (uint8 data, two
    E2M1 codes a byte, and E4M3 scale bytes, one per block), the rowwise copy as data [rows,
    cols / 2] and scales [rows, cols / 16], the columnwise one as TE's columnwise copy, the rowwise
    layout of x^T: data [cols, rows / 2], scales [cols, rows / 16]. Global amaxes: amax_ptr[0] and
    [1], or (ROW_SCALED) one per row, amax_ptr[r], and one per column, amax_ptr[rows + c].
    DEQUANT: the rowwise copy also as TE's dequantize writes it, code * _dequant_scale, to
    deq_out_ptr, in x's layout."""
    r = tl.program_id(0) * 16 + tl.arange(0, 16)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if PDL:  # launched early: the amax kernel's results are visible from here on
        gdc_wait()
    if ROW_VALUES or ROW_PACKED or DEQUANT:
        codes, scale, byte, amax = _row_copy(x, r, c0, rows, cols, amax_ptr, bits_ptr, seed_ptr, offsets, mask,
                                             RANDOM, FOUR_OVER_SIX, E4M3_MAX, ROW_SCALED, TILE_ROWS, ROW_PACKED)
        if ROW_VALUES:
            values = tl.reshape(codes * scale, (16, BLOCK_C))
            tl.store(row_values_ptr + offsets, values.to(row_values_ptr.dtype.element_ty), mask=mask)
        if ROW_PACKED:
            _store_te_bytes(row_data_ptr, row_scale_ptr, r, r < rows, c0 // 16, cols // 16, codes, scale, byte)
        if DEQUANT:
            deq = tl.reshape(codes * _dequant_scale(scale, amax, E4M3_MAX), (16, BLOCK_C))
            deq = _round_to(deq, deq_out_ptr.dtype.element_ty)  # to nearest even, also interpreted
            tl.store(deq_out_ptr + offsets, deq.to(deq_out_ptr.dtype.element_ty), mask=mask)
    if COL_VALUES or COL_PACKED:
        codes, scale, byte = _column_copy(x, x_ptr, r, c, rows, cols, amax_ptr, bits_ptr, seed_ptr, offsets, mask, RHT,
                                          RANDOM, FOUR_OVER_SIX, E4M3_MAX, ROW_SCALED, COL_PACKED)
        if COL_VALUES:  # in x's layout
            tl.store(col_values_ptr + tl.trans(offsets), (codes * scale).to(col_values_ptr.dtype.element_ty),
                     mask=tl.trans(mask))
        if COL_PACKED:  # row c of x^T: one block (8 bytes, one scale), the tile's 16 rows of x
            _store_te_bytes(col_data_ptr, col_scale_ptr, c, c < cols, tl.program_id(0), rows // 16,
                            tl.reshape(codes, (BLOCK_C, 1, 16)), tl.reshape(scale, (BLOCK_C, 1, 1)),
                            tl.reshape(byte, (BLOCK_C, 1, 1)))


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, axis: tl.constexpr):
    """max of a non-negative tile along axis, NaN where any element is."""
    return tl.reduce(a, axis, _max_keep_nan)


@triton.jit
def _row_amax_kernel(x_ptr, amax_ptr, rows, cols, COLUMNWISE: tl.constexpr, RHT: tl.constexpr,
                     ROW_TILES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row-scaled amaxes (zeroed before, NaN where a value is): amax_ptr[r] <- max_c |x[r, c]|,
    and (COLUMNWISE) amax_ptr[rows + c] <- max over the column c of x (RHT: of row c of RHT(x^T))."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_max = tl.zeros((BLOCK_C,), tl.float32)
    for tile in range(ROW_TILES):
        r = (tl.program_id(0) * ROW_TILES + tile) * 16 + tl.arange(0, 16)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
        a = tl.abs(x.to(tl.float32))
        tl.atomic_max(amax_ptr + r, _max_nan(a, 1), mask=r < rows)
        if COLUMNWISE:
            column = _max_nan(tl.abs(_rht_rows(tl.trans(x))), 1) if RHT else _max_nan(a, 0)
            col_max = tl.maximum(col_max, column, propagate_nan=tl.PropagateNan.ALL)
    if COLUMNWISE:
        if RHT:  # rounded to x's dtype once, at the end
            col_max = _round_to(col_max, x_ptr.dtype.element_ty)
        tl.atomic_max(amax_ptr + rows + c, col_max, mask=c < cols)


@triton.jit
def _max_or_nan(a):
    """max of a non-negative 2D or 3D tile, NaN if any element is (atomic_max of fp32 keeps a
    NaN): one reduction per axis with a NaN-propagating max."""
    if len(a.shape) == 3:
        a = tl.reduce(a, 2, _max_keep_nan)
    return tl.reduce(tl.reduce(a, 1, _max_keep_nan), 0, _max_keep_nan)


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, rows, cols, RHT: tl.constexpr, ROW_TILES: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """amax_ptr[0] <- max |x|, amax_ptr[1] <- max |RHT(x^T)| (RHT) or max |x|, both zeroed
    before and NaN if any value is NaN. Each program takes ROW_TILES tiles of [BLOCK_R, BLOCK_C]
    (RHT: their BLOCK_R / 16 groups of 16 rows in one batched dot), so that few atomics meet at
    the two addresses and each load has many bytes in flight."""
    if PDL:  # the quantize kernel may launch now, to wait at its gdc_wait
        gdc_launch_dependents()
    G: tl.constexpr = BLOCK_R // 16
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_max = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    rht_max = tl.zeros((G, BLOCK_C, 16), tl.float32)
    for tile in range(ROW_TILES):
        r = (tl.program_id(0) * ROW_TILES + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
        row_max = tl.maximum(row_max, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
        if RHT:  # rounded to x's dtype once, at the end
            groups = tl.permute(tl.reshape(x, (G, 16, BLOCK_C)), (0, 2, 1))  # [G, BLOCK_C, 16]: x^T's rows
            rht_max = tl.maximum(rht_max, tl.abs(_rht_rows(groups)), propagate_nan=tl.PropagateNan.ALL)
    row_amax = _max_or_nan(row_max)
    if PDL:  # launched early: the zero fill of amax is visible from here on
        gdc_wait()
    tl.atomic_max(amax_ptr, row_amax)
    if RHT:
        tl.atomic_max(amax_ptr + 1, _round_to(_max_or_nan(rht_max), x_ptr.dtype.element_ty))
    else:
        tl.atomic_max(amax_ptr + 1, row_amax)


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, out_ptr, factor_a_ptr, factor_b_ptr, bias_ptr, M, N, K,
                      stride_am, stride_ak, stride_bk, stride_bn, ALPHA_SCALE: tl.constexpr,
                      A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out = alpha * (a @ b) + bias, fp32 accumulation, one rounding to out's dtype, where
    alpha = factor_a * factor_b * ALPHA_SCALE (TE's epilogue; A_PER_ROW / B_PER_COL: a factor per
    row of a / column of b, as row-scaled NVFP4; the order of the K products and a possible FMA
    of the bias add are the implementation's, as in any GEMM)."""
    # consecutive programs take one row of output tiles: they share its A tiles (the activations,
    # the big operand) in L2, and B (a weight) stays in L2 anyway
    blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // blocks_n, tl.program_id(0) % blocks_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and columns past the end wrap around (masked at the store); the hints keep the
    # loads vectorized across the wrap
    rm_load = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rn_load = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_load[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_load[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:  # no mask along K: vectorized loads
            a, b = tl.load(a_ptrs), tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k, other=0.0)
        if INTERPRETED:  # the same exact products (Triton's CPU interpreter multiplies bf16 bit patterns)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if A_PER_ROW:
        factor_a = tl.load(factor_a_ptr + rm_load)[:, None]
    else:
        factor_a = tl.load(factor_a_ptr)
    if B_PER_COL:
        factor_b = tl.load(factor_b_ptr + rn_load)[None, :]
    else:
        factor_b = tl.load(factor_b_ptr)
    alpha = factor_a * factor_b
    if ALPHA_SCALE != 1.0:
        alpha = alpha * ALPHA_SCALE
    y = acc * alpha
    if HAS_BIAS:  # the bias in the output dtype, added in fp32 (TE's epilogue)
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            bias = _round_to_bf16(bias)
        y = y + bias[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        y = _round_to_bf16(y)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


BLOCK_C = 128  # quantize: tiles of 16 x 128, 4 KiB of bf16 per program
AMAX_BLOCK_C = 64
NUM_WARPS = 4


def packed_copy(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty TE-layout storage of an NVFP4 [rows, cols] matrix: (uint8 data [rows, cols / 2],
    float8_e4m3fn scales [rows, cols / 16])."""
    return (torch.empty(rows, cols // 2, dtype=torch.uint8, device=device),
            torch.empty(rows, cols // 16, dtype=torch.float8_e4m3fn, device=device))


def launch_quantize(x: torch.Tensor, amax: torch.Tensor, row_out=None, col_out=None, tile_rows: int = 1,
                    rht: bool = False, bits=None, seed=None, pdl: bool = False, four_over_six=None,
                    e4m3_max: int = 448, row_scaled: bool = False, deq_out=None, row_values=None,
                    col_values=None, block_c=None, num_warps=None):
    """Quantize a contiguous 2D x (cols % 16 == 0; columnwise also rows % 16 == 0) into TE's bytes,
    row_out (rowwise copy) and/or col_out (columnwise: of x^T, or RHT(x^T) with rht), each a
    (data, scale) pair of packed_copy's storage: [rows, cols] for row_out, [cols, rows] for
    col_out; and/or into exact GEMM values, row_values and/or col_values, tensors of x's shape
    (the columnwise copy in x's layout: the operand is col_values^T). amax: fp32 [amax of x, amax
    of the columnwise operand], or (row_scaled) [one per row of x, then one per column]. Rounds
    to nearest, or stochastically with explicit uint8 `bits` (x's shape, one copy at a time) or
    from an int64 `seed` tensor. four_over_six: None, "MAE" or "MSE"; e4m3_max: its global bound.
    deq_out: also write TE's dequantized rowwise copy there (x's shape). pdl: see _supports_pdl."""
    columnwise = col_out is not None or col_values is not None
    assert bits is None or (row_out is None and row_values is None) != (not columnwise), \
        "explicit bits: one copy at a time"
    rows, cols = x.shape
    # tiles of 16 x 128, or of 16 x 64 (and half the warps) where 128 does not divide the width:
    # no half-empty tiles (the faster at each of the small model's widths, docs/RESULTS.md)
    block_c = block_c or (BLOCK_C if cols % BLOCK_C == 0 else BLOCK_C // 2)
    num_warps = num_warps or NUM_WARPS * block_c // BLOCK_C
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, block_c))
    random = (RANDOM_BITS if bits is not None else RANDOM_SEED if seed is not None else NO_RANDOM).value
    mode = FOUR_OVER_SIX_MODES[four_over_six]
    # a pointer the kernel does not touch takes `amax` (any tensor would do)
    row_data, row_scale = (amax, amax) if row_out is None else (row_out[0], row_out[1].view(torch.uint8))
    col_data, col_scale = (amax, amax) if col_out is None else (col_out[0], col_out[1].view(torch.uint8))
    _quantize_kernel[grid](
        x, amax, amax if bits is None else bits, amax if seed is None else seed,
        amax if row_values is None else row_values, row_data, row_scale,
        amax if col_values is None else col_values, col_data, col_scale,
        amax if deq_out is None else deq_out, rows, cols,
        ROW_VALUES=row_values is not None, ROW_PACKED=row_out is not None, COL_VALUES=col_values is not None,
        COL_PACKED=col_out is not None, RHT=rht, TILE_ROWS=tile_rows, RANDOM=random, FOUR_OVER_SIX=mode,
        E4M3_MAX=e4m3_max, ROW_SCALED=row_scaled, DEQUANT=deq_out is not None, BLOCK_C=block_c, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
        # 4over6 compares sums of separately rounded products, as TE's reference: no FMAs
        enable_fp_fusion=mode == 0)


def launch_amax(x: torch.Tensor, amax: torch.Tensor, rht: bool = False, pdl: bool = False,
                row_scaled: bool = False, columnwise: bool = True, block_r=None, row_tiles=None,
                num_warps: int = NUM_WARPS):
    """amax (fp32 zeros) <- [max |x|, max |RHT(x^T)| (rht; rows % 16 == 0) or max |x|] for a
    contiguous 2D x; row_scaled: [max |x| of each row, then of each column of x (columnwise;
    rht: of each row of RHT(x^T))]. pdl: see _supports_pdl (not with row_scaled)."""
    rows, cols = x.shape
    if row_scaled:
        # about a thousand programs, each over several row tiles of 16 x 64
        tiles = triton.cdiv(rows, 16) * triton.cdiv(cols, AMAX_BLOCK_C)
        row_tiles = min(16 if rht else 8, triton.next_power_of_2(triton.cdiv(tiles, 1024)))
        grid = (triton.cdiv(rows, 16 * row_tiles), triton.cdiv(cols, AMAX_BLOCK_C))
        _row_amax_kernel[grid](x, amax, rows, cols, COLUMNWISE=columnwise, RHT=rht, ROW_TILES=row_tiles,
                               BLOCK_C=AMAX_BLOCK_C, num_warps=NUM_WARPS)
        return
    # one tile of 64 x 64 a program (8 KiB of bf16 in flight per load): the fastest of 3 tile
    # heights x 4 tiles a program x 3 warp counts at the small model's shapes (docs/RESULTS.md)
    block_r = block_r or (64 if rows >= 64 else 16)
    row_tiles = row_tiles or 1
    grid = (triton.cdiv(rows, block_r * row_tiles), triton.cdiv(cols, AMAX_BLOCK_C))
    _amax_kernel[grid](x, amax, rows, cols, RHT=rht, ROW_TILES=row_tiles, BLOCK_R=block_r, BLOCK_C=AMAX_BLOCK_C,
                       PDL=pdl, num_warps=num_warps, launch_pdl=pdl)


def _supports_pdl(x: torch.Tensor) -> bool:
    """Programmatic dependent launch (sm_90 and newer): a kernel launched with it starts while
    the stream's previous kernel drains, reads x, and waits for that kernel (gdc_wait) only
    before reading amax. So it is safe only where the previous kernel does not write x: in
    `quantize`, the zero fill before the amax kernel, and the amax kernel before the quantize
    kernel."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


# An opaque op, not a triton_op: inductor (torch 2.11) lowers each Triton kernel a triton_op
# launches on its own, and had x's producer (GELU, LayerNorm, the dY producers) store one copy
# of x per kernel reading it; an opaque op reads the producer's one output.
@torch.library.custom_op("nvfp4::quantize", mutates_args=())
def quantize(x: torch.Tensor, seed: torch.Tensor, tile_rows: int, rowwise: int, columnwise: int,
             rht: bool, stochastic: bool, four_over_six: int = 0, e4m3_max: int = 448, row_scaled: bool = False,
             dequantized: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_values, row_data, row_scale, col_values, col_data, col_scale, amax, deq) of a
    contiguous 2D x in two reads. rowwise / columnwise: the forms to write of each copy (a bit set
    of VALUES and PACKED): NVFP4(x) (rowwise) and NVFP4 of x^T or RHT(x^T) (columnwise) as exact
    GEMM values (bf16, in x's layout for both copies) and/or TE's bytes (data uint8 and scales
    float8_e4m3fn: rowwise [rows, cols / 2] and [rows, cols / 16], columnwise [cols, rows / 2] and
    [cols, rows / 16]), a form not asked for being empty; the fp32 global amaxes [of x, of the
    columnwise operand], or (row_scaled) [per row of x, then per row of the columnwise operand];
    and (dequantized) the rowwise copy as TE's dequantize gives it, in x's dtype. seed: int64
    tensor of one element, read when stochastic. four_over_six: 0 (off), 1 (MAE), 2 (MSE)."""
    amax = torch.zeros(x.shape[0] + x.shape[1] if row_scaled else 2, dtype=torch.float32, device=x.device)
    pdl = _supports_pdl(x) and not row_scaled
    launch_amax(x, amax, rht and bool(columnwise), pdl=pdl, row_scaled=row_scaled, columnwise=bool(columnwise))
    row_values, row_data, row_scale, col_values, col_data, col_scale, deq = _quantize_outputs(
        x, rowwise, columnwise, dequantized)
    launch_quantize(x, amax, (row_data, row_scale) if rowwise & PACKED else None,
                    (col_data, col_scale) if columnwise & PACKED else None, tile_rows, rht,
                    seed=seed if stochastic else None, pdl=pdl, four_over_six=(None, "MAE", "MSE")[four_over_six],
                    e4m3_max=e4m3_max, row_scaled=row_scaled, deq_out=deq if dequantized else None,
                    row_values=row_values if rowwise & VALUES else None,
                    col_values=col_values if columnwise & VALUES else None)
    return row_values, row_data, row_scale, col_values, col_data, col_scale, amax, deq


@quantize.register_fake
def _(x, seed, tile_rows, rowwise, columnwise, rht, stochastic, four_over_six=0, e4m3_max=448, row_scaled=False,
      dequantized=False):
    amax = x.new_empty(x.shape[0] + x.shape[1] if row_scaled else 2, dtype=torch.float32)
    *copies, deq = _quantize_outputs(x, rowwise, columnwise, dequantized)
    return *copies, amax, deq


def _quantize_outputs(x: torch.Tensor, rowwise: int, columnwise: int, dequantized: bool):
    rows, cols = x.shape
    def values(form):
        return torch.empty(x.shape if form & VALUES else 0, dtype=torch.bfloat16, device=x.device)
    row = packed_copy(rows if rowwise & PACKED else 0, cols if rowwise & PACKED else 0, x.device)
    col = packed_copy(cols if columnwise & PACKED else 0, rows if columnwise & PACKED else 0, x.device)
    return (values(rowwise), *row, values(columnwise), *col,
            torch.empty(x.shape if dequantized else 0, dtype=x.dtype, device=x.device))


@triton.jit
def _unpack_kernel(data_ptr, scale_ptr, out_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out [rows, cols] <- code * scale of TE's bytes (data [rows, cols / 2], scale bytes
    [rows, cols / 16]): the exact GEMM operand of a copy kept packed, in out's dtype. A nibble's
    index bits (0-2) at fp16's bits 9-11 and its sign at bit 15 make the fp16 code * 2^-14 (see
    _nibbles), so each value is that times (scale * 2^14), both exact."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    mask = (r[:, None] < rows) & (b[None, :] < cols // 2)
    byte = tl.load(data_ptr + r[:, None] * (cols // 2) + b[None, :], mask=mask, other=0).to(tl.int32)
    nibbles = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_R, BLOCK_C))
    half = (((nibbles & 7) << 9) | ((nibbles & 8) << 12)).to(tl.uint16).to(tl.float16, bitcast=True)
    blocks = tl.reshape(half.to(tl.float32), (BLOCK_R, BLOCK_C // 16, 16))
    s = tl.program_id(1) * (BLOCK_C // 16) + tl.arange(0, BLOCK_C // 16)
    scale_byte = tl.load(scale_ptr + r[:, None] * (cols // 16) + s[None, :],
                         mask=(r[:, None] < rows) & (s[None, :] < cols // 16), other=0).to(tl.int32)
    # an E4M3 scale's 7 bits at fp16's bits 7-13 make the fp16 scale * 2^-8 (subnormals too): the
    # factor scale * 2^14 is that times 2^22; 0x7F is E4M3's NaN
    scale = ((scale_byte & 0x7F) << 7).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 4194304.0
    scale = tl.where(scale_byte == 0x7F, float("nan"), scale)
    values = tl.reshape(blocks * scale[:, :, None], (BLOCK_R, BLOCK_C))
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], values.to(out_ptr.dtype.element_ty),
             mask=(r[:, None] < rows) & (c[None, :] < cols))


@torch.library.custom_op("nvfp4::unpack", mutates_args=())
def unpack(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact GEMM operand (code * E4M3 scale, bf16 [rows, cols]) of TE's bytes: data uint8
    [rows, cols / 2], scale float8_e4m3fn [rows, cols / 16]."""
    rows, cols = data.shape[0], data.shape[1] * 2
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device=data.device)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 128))
    _unpack_kernel[grid](data, scale.view(torch.uint8), out, rows, cols, BLOCK_R=16, BLOCK_C=128, num_warps=4)
    return out


@unpack.register_fake
def _(data, scale):
    return data.new_empty(data.shape[0], data.shape[1] * 2, dtype=torch.bfloat16)


@triton.jit
def _fp8_kernel(x_ptr, amax_ptr, out_ptr, out_t_words_ptr, scale_inv_ptr, rows, cols, FP8_MAX: tl.constexpr,
                X_MAX: tl.constexpr, ROWWISE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """TE's current scaling (formats.quantize_fp8) of a [BLOCK_R, BLOCK_C] tile of x from one read:
    scale = FP8_MAX / amax (inf -> X_MAX, the largest value of x's dtype; amax = 0 -> 1), values
    x * scale rounded to out's FP8 format, written row-major to out (ROWWISE) and as x^T
    (TRANSPOSED: Hopper's FP8 GEMM takes its operands K-major, so the dgrad and wgrad operands
    need the transposes) to out_t_words, x^T's bytes as int32 words (rows % 4 == 0): four bytes
    of one column of x a word. The tile is transposed as x's 16-bit values, before any conversion:
    Triton 3.6 on sm_90 garbled 8-bit tiles moved between layouts (the transposed copy held NaN
    bytes where the rowwise one held zeros; triton-lang/triton#11111 reports the like), so the
    bytes come from _fp8_byte, as int32, after the transpose, and no 8-bit tensor changes layout.
    Program (0, 0) writes scale_inv = 1 / scale."""
    amax = tl.load(amax_ptr)
    scale = tl.math.div_rn(tl.full(amax.shape, FP8_MAX, tl.float32), amax)
    scale = tl.where(scale == float("inf"), X_MAX, scale)
    scale = tl.where(amax == 0.0, 1.0, scale)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_inv_ptr, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale))
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
    if ROWWISE:
        tl.store(out_ptr + r[:, None] * cols + c[None, :], _to_fp8(x.to(tl.float32) * scale, out_ptr.dtype.element_ty),
                 mask=mask)
    if TRANSPOSED:  # x^T's rows in groups of 4 (a word's bytes), each byte in an int32
        xt = tl.reshape(tl.trans(x), (BLOCK_C, BLOCK_R // 4, 4))
        byte = _fp8_byte(xt.to(tl.float32) * scale, out_ptr.dtype.element_ty)
        even, odd = tl.split(tl.reshape(byte, (BLOCK_C, BLOCK_R // 4, 2, 2)))  # rows 4w + 2j (+ 1)
        low, high = tl.split(even | (odd << 8))  # j = 0, 1: the word's low and high 16 bits
        w = tl.program_id(0) * (BLOCK_R // 4) + tl.arange(0, BLOCK_R // 4)
        tl.store(out_t_words_ptr + c[:, None] * (rows // 4) + w[None, :], low | (high << 16),
                 mask=(c[:, None] < cols) & (w[None, :] * 4 < rows))


@triton.jit
def _to_fp8(y, fp8: tl.constexpr):
    """fp32 y (|y| <= the format's max, or NaN) rounded to nearest even in FP8 format fp8: the GPU's
    conversion; Triton's interpreter truncates and flushes subnormals, so there the value is
    rounded by bits and its byte (sign, exponent, mantissa; subnormals; NaN 0x7F) assembled."""
    if INTERPRETED:
        MANTISSA: tl.constexpr = 3 if fp8 == tl.float8e4nv else 2
        BIAS: tl.constexpr = 7 if fp8 == tl.float8e4nv else 15
        bits = y.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, 1 - BIAS)
        quantum = ((exponent - MANTISSA + 127) << 23).to(tl.float32, bitcast=True)
        inv_quantum = ((127 - exponent + MANTISSA) << 23).to(tl.float32, bitcast=True)
        steps = _round_half_even(tl.abs(y) * inv_quantum)  # the value in quanta of its binade
        a = (steps * quantum).to(tl.int32, bitcast=True)
        normal = ((a >> 23) & 0xFF) >= 128 - BIAS
        magnitude = tl.where(normal, ((((a >> 23) & 0xFF) - 127 + BIAS) << MANTISSA) | ((a >> (23 - MANTISSA)) & ((1 << MANTISSA) - 1)),
                             steps.to(tl.int32))
        byte = tl.where(y != y, 0x7F, magnitude | ((bits >> 24) & 0x80))
        return byte.to(tl.uint8).to(fp8, bitcast=True)
    return y.to(fp8)


@triton.jit
def _fp8_byte(y, fp8: tl.constexpr):
    """_to_fp8's byte of fp32 y as an int32 (0..255); on the GPU one conversion instruction a
    value, in inline PTX, so that no 8-bit tensor exists for Triton to move between layouts."""
    if INTERPRETED:
        return _to_fp8(y, fp8).to(tl.uint8, bitcast=True).to(tl.int32)
    if fp8 == tl.float8e4nv:
        asm: tl.constexpr = "{ .reg .b16 h; cvt.rn.satfinite.e4m3x2.f32 h, 0f00000000, $1; cvt.u32.u16 $0, h; }"
    else:
        asm: tl.constexpr = "{ .reg .b16 h; cvt.rn.satfinite.e5m2x2.f32 h, 0f00000000, $1; cvt.u32.u16 $0, h; }"
    return tl.inline_asm_elementwise(asm, "=r,r", [y], dtype=tl.int32, is_pure=True, pack=1)


FP8_CODES = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}


@torch.library.custom_op("nvfp4::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor, fp8_code: int, rowwise: bool, transposed: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [rows, cols], values^T [cols, rows], scale_inv) of TE's current scaling of a
    contiguous 2D x in two reads (amax, then the cast), FP8 E4M3 (fp8_code 0) or E5M2 (1); a copy
    not asked for is empty. (The amax as a torch reduction, for inductor to fuse into x's
    producer, was slower: inductor recomputed the producer in a reduction kernel of its own,
    docs/RESULTS.md.)"""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)[fp8_code]
    rows, cols = x.shape
    amax = torch.zeros(2, dtype=torch.float32, device=x.device)
    launch_amax(x, amax)
    # x^T as words: rows % 4 == 0 (Hopper's FP8 GEMM needs multiples of 16); otherwise the rowwise
    # copy, transposed by torch
    words = transposed and rows % 4 == 0
    out, out_t, scale_inv = _fp8_outputs(x, fp8, rowwise or not words, transposed)
    # tiles of 64 x 64: the fastest of the tiles tried at the small model's shapes (docs/RESULTS.md)
    grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64))
    _fp8_kernel[grid](x, amax, out, out_t.view(torch.int32) if words else out, scale_inv, rows, cols,
                      FP8_MAX=torch.finfo(fp8).max, X_MAX=torch.finfo(x.dtype).max, ROWWISE=rowwise or not words,
                      TRANSPOSED=words, BLOCK_R=64, BLOCK_C=64, num_warps=4)
    if transposed and not words:
        out_t.copy_(out.t())
        out = out if rowwise else out.new_empty((0,))
    return out, out_t, scale_inv


@quantize_fp8.register_fake
def _(x, fp8_code, rowwise, transposed):
    return _fp8_outputs(x, (torch.float8_e4m3fn, torch.float8_e5m2)[fp8_code], rowwise, transposed)


def _fp8_outputs(x, fp8, rowwise, transposed):
    rows, cols = x.shape
    return (x.new_empty((rows, cols) if rowwise else (0,), dtype=fp8),
            x.new_empty((cols, rows) if transposed else (0,), dtype=fp8), x.new_empty((), dtype=torch.float32))


def _alpha_scale(e4m3_max_a: int, e4m3_max_b: int) -> float:
    return torch.tensor(1.0, dtype=torch.float32).div(alpha_denom(e4m3_max_a, e4m3_max_b)).item()


# TE's alpha divides by 6 * 6 * e4m3_max_a * e4m3_max_b: on CUDA torch multiplies by the divisor's
# fp32 reciprocal. Computed here, once: a compiled step reads constants (no .item() in its graph).
ALPHA_SCALES = {(a, b): _alpha_scale(a, b) for a in E4M3_MAXES for b in E4M3_MAXES}


def nvfp4_alpha_scale(e4m3_max_a: int = 448, e4m3_max_b: int = 448) -> float:
    """The fp32 factor 1 / (6 * 6 * e4m3_max_a * e4m3_max_b) of the GEMM epilogue."""
    return ALPHA_SCALES[(e4m3_max_a, e4m3_max_b)]


MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K, MM_WARPS, MM_STAGES = 128, 128, 64, 4, 3  # the fastest tried on Hopper


def launch_scaled_mm(a, b, factor_a, factor_b, bias, out, alpha_scale, launcher=None):
    """out = factor_a * factor_b * alpha_scale * (a @ b) + bias (see _scaled_mm_kernel)."""
    (M, K), N = a.shape, b.shape[1]
    grid = (triton.cdiv(M, MM_BLOCK_M) * triton.cdiv(N, MM_BLOCK_N),)
    (launcher or _scaled_mm_kernel)[grid](
        a, b, out, factor_a, factor_b, factor_a if bias is None else bias, M, N, K, a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), ALPHA_SCALE=alpha_scale, A_PER_ROW=factor_a.numel() > 1,
        B_PER_COL=factor_b.numel() > 1, HAS_BIAS=bias is not None,
        BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K,
        EVEN_K=K % MM_BLOCK_K == 0, num_warps=MM_WARPS, num_stages=MM_STAGES)


# A triton_op suits the GEMM: its operands are the quantize op's outputs, already in memory.
@torch.library.triton_op("nvfp4::scaled_mm", mutates_args=())
def scaled_mm(a: torch.Tensor, b: torch.Tensor, factor_a: torch.Tensor, factor_b: torch.Tensor,
              bias: Optional[torch.Tensor], alpha_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """factor_a * factor_b * alpha_scale * (a @ b) + bias in out_dtype, from one fp32 accumulator
    (a, b: exact bf16 operand values; factors: fp32, e.g. the operands' global amaxes: a scalar,
    or one per row of a / per column of b)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    launch_scaled_mm(a, b, factor_a, factor_b, bias, out, alpha_scale,
                     launcher=torch.library.wrap_triton(_scaled_mm_kernel))
    return out
