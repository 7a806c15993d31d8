"""Fused Triton kernels for NVFP4 on GPUs, bitwise equal to formats.quantize_nvfp4.

The op `quantize` reads a GEMM operand twice. The amax kernel reads it once for both global
amaxes (of the operand, and of RHT(operand^T) for the wgrad copy). The quantize kernel reads
each [16, 128] tile once, computes its 1x16 (or 16x16) block amaxes, rounds the E4M3 block
scales, scales, rounds to E2M1 (to nearest even, or stochastically) and writes code * scale
as bf16 for up to two copies: rowwise, and columnwise, where blocks run 16 down a column,
i.e. the 1x16 blocks of the transpose, handled on the tile's transpose (RHT: one [128, 16] @
[16, 16] dot), so that each block's scale is computed by few threads, and written in the
operand's own layout so the GEMM reads a transposed view: no transposed copy, no cuBLAS
matmul with a 16x16 matrix.

The kernel does little arithmetic per byte, and its per-element rounding shares the
integer/logic pipe with the index math, so the rounding uses bit operations where compares and
selects would do.

Exactness: every step is the fp32 operation of formats.quantize_nvfp4 (IEEE division via
div_rn; divisions by powers of two are exact multiplications), and round-to-nearest-even is the
(y + c) - c identity, c = 2^23 times the grid spacing. The RHT sums 16 exact products in
fp32, as TE's own RHT kernel does on tensor cores; its summation order, like any GEMM's, is the
implementation's (the reference's torch.matmul has its own). tests/test_kernels.py checks the
kernels on the GPU and through Triton's CPU interpreter.

Stochastic rounding draws its 8 bits per element in the kernel (Philox, from a seed tensor drawn
from torch's generator; the columnwise copy from seed + 1), so no random tensor is
materialized; `launch_quantize` also takes explicit bits, which is how the tests compare it with the
reference bit for bit.

`scaled_mm` is the GEMM of fprop and dgrad with TE's epilogue fused: alpha from the two global
amaxes, the bias, one rounding to the output dtype, so the fp32 product never goes to memory.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .formats import NVFP4_ALPHA_DENOM, RHT_SIGNS

INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)  # as triton.jit reads it (TRITON_INTERPRET=1)

FLT_MAX = tl.constexpr(3.4028234663852886e38)
RECIP_6 = tl.constexpr(0.1666666716337204)  # torch.reciprocal(6.0) in fp32, as TE's reference multiplies by it
RNE_MAGIC = tl.constexpr(8388608.0)  # 2^23
HALF_RNE_MAGIC = tl.constexpr(4194304.0)  # 2^22
EXPONENT_BITS = tl.constexpr(-8388608)  # 0xFF800000: sign and exponent of an fp32
ONE_MANTISSA_BIT = tl.constexpr(-4194304)  # 0xFFC00000: ... and the top mantissa bit
SIGN_BIT = tl.constexpr(-2147483648)  # 0x80000000
RHT_NEGATIVE_ROWS = tl.constexpr(sum(1 << i for i, s in enumerate(RHT_SIGNS) if s < 0))
# where stochastic rounding takes its bits from: none (round to nearest), a bits tensor, a seed
NO_RANDOM, RANDOM_BITS, RANDOM_SEED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


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
    """t in [0, 8) down to the E2M1 grid (6 at most): the top mantissa bit from 1 up, else 0.5 or 0."""
    return tl.where(t >= 1.0, _truncate(t, ONE_MANTISSA_BIT), tl.where(t >= 0.5, 0.5, 0.0))


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
    """fp32 to the nearest bf16 value, ties to even, NaN kept, back in fp32: the GPU's
    conversion, spelled out under Triton's CPU interpreter, which truncates instead."""
    if INTERPRETED:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return y.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _hadamard16():
    """TE's RHT matrix diag(signs) @ Sylvester H16 / 4, where H16[i, j] = (-1)^popcount(i & j)."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    both = i & j
    parity = (both ^ (both >> 1) ^ (both >> 2) ^ (both >> 3)) & 1
    sign = 1 - 2 * ((RHT_NEGATIVE_ROWS >> i) & 1)
    return (sign * (1 - 2 * parity)).to(tl.float32) * 0.25


@triton.jit
def _rht_rows(xt):
    """The 16-point RHT along each row of a [R, 16] tile xt (x^T's rows: 16 tokens), in fp32:
    16 exact products summed (16-bit inputs: tensor cores in their dtype, which holds +-1/4,
    with fp32 accumulation; fp32, and the interpreter, which rounds 16-bit products: IEEE FMAs).
    TE's reference transforms in x's dtype: round with _round_to(y, xt.dtype)."""
    if xt.dtype == tl.float32 or INTERPRETED:
        return tl.dot(xt.to(tl.float32), _hadamard16(), input_precision="ieee")
    return tl.dot(xt, _hadamard16().to(xt.dtype), out_dtype=tl.float32)


@triton.jit
def _round_to(y, dtype: tl.constexpr):
    """fp32 y rounded to dtype (to nearest even), back in fp32. Monotonic, so it commutes with max |.|."""
    if dtype == tl.bfloat16:
        return _round_to_bf16(y)
    return y.to(dtype).to(tl.float32)


@triton.jit
def _random_uniform(seed, first_counter, WIDTH: tl.constexpr):
    """u = k / 256 for a uniform random byte k per element of a [len(first_counter), WIDTH] tile:
    one Philox call (4 x 32 bits) per 16 neighbours in a row, counted on from the row's
    first_counter."""
    rows: tl.constexpr = first_counter.shape[0]
    counter = first_counter[:, None] + tl.arange(0, WIDTH // 16)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (rows, WIDTH // 16, 4))
    byte = tl.arange(0, 4)[None, None, None, :] * 8
    k = tl.reshape((words[:, :, :, None] >> byte) & 0xFF, (rows, WIDTH))
    return k.to(tl.float32) * (1.0 / 256.0)


@triton.jit
def _block_scales(block_amax, amax):
    """E4M3 decode scale and fp32 encode scale of blocks with `block_amax` in a tensor of
    global `amax` (TE: global encode 2688 / amax, at most FLT_MAX, 0 (amax = inf) -> 1)."""
    g_enc = tl.minimum(tl.math.div_rn(tl.full([], 2688.0, tl.float32), amax), FLT_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
    g_enc = tl.where(g_enc == 0.0, 1.0, g_enc)
    g_dec = tl.math.div_rn(tl.full([], 1.0, tl.float32), g_enc)
    decode = tl.minimum(block_amax * (g_enc * RECIP_6), FLT_MAX, propagate_nan=tl.PropagateNan.ALL)
    decode = tl.clamp(decode, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    scale = _round_e4m3(decode)
    encode = tl.minimum(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale * g_dec), FLT_MAX,
                        propagate_nan=tl.PropagateNan.ALL)
    return scale, encode


@triton.jit
def _round_blocks(blocks, scale, encode, u, RANDOM: tl.constexpr):
    """code * scale of fp32 `blocks` (scale, encode broadcast to blocks' shape); u: uniform
    k / 256 per element for stochastic rounding, unused otherwise."""
    v = blocks * encode
    # |clamp(v, -6, 6)|; min drops a NaN, but x holds a NaN only where its amax, and so every
    # scale, is NaN (TE's reference: the whole tensor is NaN)
    a = tl.minimum(tl.abs(v), 6.0)
    if RANDOM == NO_RANDOM:
        q = _round_e2m1(a)
    else:  # TE's software rounder: t = |x| + u * step(|x|), floor to the grid at t (t < 8)
        q = _floor_e2m1(a + u * _e2m1_step(a))
    # v's sign back on q; v + 0.0 turns -0.0 into +0.0, as the reference's v < 0 test does
    sign = (v + 0.0).to(tl.int32, bitcast=True) & SIGN_BIT
    q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return q * scale


@triton.jit
def _uniform(bits_ptr, seed_ptr, seed_offset, offsets, first_counter, mask, RANDOM: tl.constexpr):
    """u = bits / 256 for 8 random bits per element of the tile at `offsets`, for stochastic
    rounding: explicit (RANDOM_BITS) or drawn from the seed (each copy its own Philox key: seed +
    seed_offset; counters from first_counter, see _random_uniform); zeros when rounding to nearest."""
    if RANDOM == RANDOM_BITS:
        u = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.float32) * (1.0 / 256.0)
    elif RANDOM == RANDOM_SEED:
        u = _random_uniform(tl.load(seed_ptr) + seed_offset, first_counter, offsets.shape[1])
    else:
        u = tl.zeros(offsets.shape, tl.float32)
    return u


@triton.jit
def _nvfp4_kernel(x_ptr, amax_ptr, bits_ptr, seed_ptr, row_out_ptr, col_out_ptr, rows, cols,
                  ROWWISE: tl.constexpr, COLUMNWISE: tl.constexpr, RHT: tl.constexpr,
                  TILE_ROWS: tl.constexpr, RANDOM: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """One read of a [16, BLOCK_C] tile of x, up to two quantized copies written in x's layout:
    ROWWISE: blocks of 16 along rows (TILE_ROWS=16: 16x16 tiles), global amax amax_ptr[0];
    COLUMNWISE: blocks of 16 down columns, i.e. x^T's 1x16 blocks (RHT: of RHT(x^T)), global
    amax amax_ptr[1]. The GEMM reads the columnwise copy as a transposed view."""
    r = tl.program_id(0) * 16 + tl.arange(0, 16)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if PDL:  # launched early: the amax kernel's results are visible from here on
        gdc_wait()
    if ROWWISE:
        blocks = tl.reshape(x.to(tl.float32), (16, BLOCK_C // 16, 16))
        block_amax = tl.max(tl.abs(blocks), axis=2, keep_dims=True)
        if TILE_ROWS == 16:  # 16x16 tiles: one amax for the tile's 16 rows
            block_amax = tl.max(block_amax, axis=0, keep_dims=True)
        u = tl.reshape(_uniform(bits_ptr, seed_ptr, 0, offsets, (r * cols + c0) // 16, mask, RANDOM), blocks.shape)
        scale, encode = _block_scales(block_amax, tl.load(amax_ptr))
        values = _round_blocks(blocks, scale, encode, u, RANDOM)
        tl.store(row_out_ptr + offsets, tl.reshape(values, (16, BLOCK_C)).to(row_out_ptr.dtype.element_ty), mask=mask)
    if COLUMNWISE:  # on x^T's tile [BLOCK_C, 16], whose rows are the blocks (one per thread group)
        xt = tl.trans(x)
        blocks = _round_to(_rht_rows(xt), xt.dtype) if RHT else xt.to(tl.float32)
        block_amax = tl.max(tl.abs(blocks), axis=1, keep_dims=True)
        scale, encode = _block_scales(block_amax, tl.load(amax_ptr + 1))
        u = _uniform(bits_ptr, seed_ptr, 1, tl.trans(offsets), tl.program_id(0) * cols + c, tl.trans(mask), RANDOM)
        values = _round_blocks(blocks, scale, encode, u, RANDOM)
        tl.store(col_out_ptr + tl.trans(offsets), values.to(col_out_ptr.dtype.element_ty), mask=tl.trans(mask))


@triton.jit
def _max_or_nan(a):
    """max of a non-negative tile, NaN if any element is (atomic_max of fp32 keeps a NaN)."""
    has_nan = tl.sum(tl.sum((a != a).to(tl.int32), axis=1), axis=0) > 0
    return tl.where(has_nan, float("nan"), tl.max(tl.max(a, axis=1), axis=0))


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, rows, cols, RHT: tl.constexpr, ROW_TILES: tl.constexpr,
                 BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """amax_ptr[0] <- max |x|, amax_ptr[1] <- max |RHT(x^T)| (RHT) or max |x|, both zeroed
    before and NaN if any value is NaN. Each program takes ROW_TILES tiles of 16 rows, so
    that few atomics meet at the two addresses."""
    if PDL:  # the quantize kernel may launch now, to wait at its gdc_wait
        gdc_launch_dependents()
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_max = tl.zeros((16, BLOCK_C), tl.float32)
    rht_max = tl.zeros((BLOCK_C, 16), tl.float32)
    for tile in range(ROW_TILES):
        r = (tl.program_id(0) * ROW_TILES + tile) * 16 + tl.arange(0, 16)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
        row_max = tl.maximum(row_max, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
        if RHT:  # rounded to x's dtype once, at the end
            rht_max = tl.maximum(rht_max, tl.abs(_rht_rows(tl.trans(x))), propagate_nan=tl.PropagateNan.ALL)
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
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out = alpha * (a @ b) + bias, fp32 accumulation, one rounding to out's dtype, where
    alpha = factor_a * factor_b * ALPHA_SCALE (TE's epilogue; the order of the K products and
    a possible FMA of the bias add are the implementation's, as in any GEMM)."""
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
    alpha = tl.load(factor_a_ptr) * tl.load(factor_b_ptr)
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


def launch_quantize(x: torch.Tensor, amax: torch.Tensor, row_out=None, col_out=None, tile_rows: int = 1,
           rht: bool = False, bits=None, seed=None, pdl: bool = False):
    """Quantize a contiguous 2D x (cols % 16 == 0; columnwise also rows % 16 == 0) into
    row_out (rowwise copy) and/or col_out (columnwise: x^T, or RHT(x^T) with rht, quantized in
    x's layout, so col_out^T is the operand). amax: fp32 [amax of x, amax of the columnwise
    operand]. Rounds to nearest, or stochastically with explicit uint8 `bits` (x's shape, one
    copy at a time) or from an int64 `seed` tensor. pdl: see _supports_pdl."""
    assert bits is None or (row_out is None) != (col_out is None), "explicit bits: one copy at a time"
    rows, cols = x.shape
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, BLOCK_C))
    random = (RANDOM_BITS if bits is not None else RANDOM_SEED if seed is not None else NO_RANDOM).value
    # a pointer the kernel does not touch takes `amax` (any tensor would do)
    _nvfp4_kernel[grid](x, amax, amax if bits is None else bits, amax if seed is None else seed,
                        amax if row_out is None else row_out, amax if col_out is None else col_out,
                        rows, cols, ROWWISE=row_out is not None, COLUMNWISE=col_out is not None,
                        RHT=rht, TILE_ROWS=tile_rows, RANDOM=random, BLOCK_C=BLOCK_C, PDL=pdl,
                        num_warps=NUM_WARPS, launch_pdl=pdl)


def launch_amax(x: torch.Tensor, amax: torch.Tensor, rht: bool = False, pdl: bool = False):
    """amax (fp32, two zeros) <- [max |x|, max |RHT(x^T)| (rht; rows % 16 == 0) or max |x|]
    for a contiguous 2D x. pdl: see _supports_pdl."""
    rows, cols = x.shape
    # about a thousand programs, each over several row tiles of 16 x 64, so that few atomics
    # meet at the two addresses and each program has enough rows to read
    tiles = triton.cdiv(rows, 16) * triton.cdiv(cols, AMAX_BLOCK_C)
    row_tiles = min(16 if rht else 8, triton.next_power_of_2(triton.cdiv(tiles, 1024)))
    grid = (triton.cdiv(rows, 16 * row_tiles), triton.cdiv(cols, AMAX_BLOCK_C))
    _amax_kernel[grid](x, amax, rows, cols, RHT=rht, ROW_TILES=row_tiles, BLOCK_C=AMAX_BLOCK_C,
                       PDL=pdl, num_warps=NUM_WARPS, launch_pdl=pdl)


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
def quantize(x: torch.Tensor, seed: torch.Tensor, tile_rows: int, rowwise: bool, columnwise: bool,
             rht: bool, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, col, amax) of a contiguous 2D x in two reads: code * E4M3 scale (exact in bf16) of
    NVFP4(x) (rowwise) and of x^T or RHT(x^T) stored in x's layout (columnwise), a copy not
    asked for being empty, and the fp32 global amaxes [of x, of the columnwise operand].
    seed: int64 tensor of one element, read when stochastic."""
    amax = torch.zeros(2, dtype=torch.float32, device=x.device)
    pdl = _supports_pdl(x)
    launch_amax(x, amax, rht and columnwise, pdl=pdl)
    row_out, col_out = _quantize_outputs(x, rowwise, columnwise)
    launch_quantize(x, amax, row_out if rowwise else None, col_out if columnwise else None, tile_rows, rht,
           seed=seed if stochastic else None, pdl=pdl)
    return row_out, col_out, amax


@quantize.register_fake
def _(x, seed, tile_rows, rowwise, columnwise, rht, stochastic):
    return *_quantize_outputs(x, rowwise, columnwise), x.new_empty(2, dtype=torch.float32)


def _quantize_outputs(x: torch.Tensor, rowwise: bool, columnwise: bool):
    return tuple(torch.empty(x.shape if wanted else 0, dtype=torch.bfloat16, device=x.device)
                 for wanted in (rowwise, columnwise))


# TE's alpha divides by 6 * 6 * 448 * 448: on CUDA torch multiplies by the divisor's fp32 reciprocal.
NVFP4_ALPHA_SCALE = torch.tensor(1.0, dtype=torch.float32).div(NVFP4_ALPHA_DENOM).item()
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K, MM_WARPS, MM_STAGES = 128, 128, 64, 4, 3  # the fastest tried on Hopper


def launch_scaled_mm(a, b, factor_a, factor_b, bias, out, alpha_scale, launcher=None):
    """out = factor_a * factor_b * alpha_scale * (a @ b) + bias (see _scaled_mm_kernel)."""
    (M, K), N = a.shape, b.shape[1]
    grid = (triton.cdiv(M, MM_BLOCK_M) * triton.cdiv(N, MM_BLOCK_N),)
    (launcher or _scaled_mm_kernel)[grid](
        a, b, out, factor_a, factor_b, factor_a if bias is None else bias, M, N, K, a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), ALPHA_SCALE=alpha_scale, HAS_BIAS=bias is not None,
        BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K,
        EVEN_K=K % MM_BLOCK_K == 0, num_warps=MM_WARPS, num_stages=MM_STAGES)


# A triton_op suits the GEMM: its operands are the quantize op's outputs, already in memory.
@torch.library.triton_op("nvfp4::scaled_mm", mutates_args=())
def scaled_mm(a: torch.Tensor, b: torch.Tensor, factor_a: torch.Tensor, factor_b: torch.Tensor,
              bias: Optional[torch.Tensor], alpha_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """factor_a * factor_b * alpha_scale * (a @ b) + bias in out_dtype, from one fp32 accumulator
    (a, b: exact bf16 operand values; factors: fp32 scalars, e.g. the operands' global amaxes)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    launch_scaled_mm(a, b, factor_a, factor_b, bias, out, alpha_scale,
                     launcher=torch.library.wrap_triton(_scaled_mm_kernel))
    return out
