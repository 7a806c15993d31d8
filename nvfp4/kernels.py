"""Fused Triton kernels for NVFP4 on GPUs, bitwise equal to formats.quantize_nvfp4.

`quantize_values`: one program reads a tile of the operand, computes its 1x16 (or 16x16) block
amaxes, rounds the E4M3 block scales, scales, rounds to E2M1 (to nearest even, or stochastically)
and writes code * scale as bf16: one read and one write instead of inductor's dozens of kernels
per GEMM operand (which also took minutes to compile for the whole model). The wgrad operands
RHT(X^T) are quantized columnwise in X's own layout (blocks of 16 down a column, the RHT a 16x16
dot per 16-row group) and the GEMM reads the transposed view: no transposed copy, no cuBLAS
matmul with a 16x16 matrix (a shape it suits badly). `rht_amax` is their amax pass.

Exactness: every step is the fp32 operation of formats.quantize_nvfp4 (IEEE division via
div_rn; divisions by powers of two are exact multiplications), and round-to-nearest-even is the
(y + 2^23) - 2^23 identity, valid here because 0 <= y < 2^22. The RHT sums 16 exact products in
fp32 (an IEEE fp32 dot), as TE's own RHT kernel does on tensor cores; its summation order, like
any GEMM's, is the implementation's (the reference's torch.matmul has its own). tests/test_kernels.py checks
the kernels on the GPU and through Triton's CPU interpreter.

Stochastic rounding draws its 8 bits per element in the kernel (Philox, from a seed tensor drawn
from torch's generator), so no random tensor is materialized; `launch` also takes explicit bits,
which is how the tests compare it with the reference bit for bit.
"""
import torch
import triton
import triton.language as tl

from .formats import RHT_SIGNS

FLT_MAX = tl.constexpr(3.4028234663852886e38)
RECIP_6 = tl.constexpr(0.1666666716337204)  # torch.reciprocal(6.0) in fp32, as TE's reference multiplies by it
RNE_MAGIC = tl.constexpr(8388608.0)  # 2^23
RHT_NEGATIVE_ROWS = tl.constexpr(sum(1 << i for i, s in enumerate(RHT_SIGNS) if s < 0))
# where stochastic rounding takes its bits from: none (round to nearest), a bits tensor, a seed
NO_RANDOM, RANDOM_BITS, RANDOM_SEED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _round_half_even(y):
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def _e2m1_step(a):
    return tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))


@triton.jit
def _e2m1_inv_step(a):
    """1 / _e2m1_step(a), exact (a power of two): multiplying by it is the exact division."""
    return tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))


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
    """fp32 to the nearest bf16 value, ties to even, NaN kept: the GPU's conversion, spelled out
    because Triton's CPU interpreter truncates instead."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(y != y, y, bits.to(tl.float32, bitcast=True))


@triton.jit
def _hadamard16():
    """TE's RHT matrix diag(signs) @ Sylvester H16 / 4; H16[i, j] = (-1)^popcount(i & j)."""
    i = tl.arange(0, 16)[:, None]
    both = i & tl.arange(0, 16)[None, :]
    parity = (both ^ (both >> 1) ^ (both >> 2) ^ (both >> 3)) & 1
    sign = 1 - 2 * ((RHT_NEGATIVE_ROWS >> i) & 1)
    return (sign * (1 - 2 * parity)).to(tl.float32) * 0.25


@triton.jit
def _rht_columns(x, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IN_DTYPE: tl.constexpr):
    """The 16-point RHT down each column of every 16-row group of an fp32 tile ([BLOCK_R // 16,
    16, BLOCK_C]), i.e. along the rows of x^T: exact products, fp32 sums, one rounding to the
    input's dtype, as TE's reference transforms in x's dtype."""
    groups = tl.reshape(x, (BLOCK_R // 16, 16, BLOCK_C))
    h_t = tl.broadcast_to(tl.trans(_hadamard16())[None, :, :], (BLOCK_R // 16, 16, 16))
    y = tl.dot(h_t, groups, input_precision="ieee")
    if IN_DTYPE == tl.bfloat16:
        return _round_to_bf16(y)
    return y.to(IN_DTYPE).to(tl.float32)


@triton.jit
def _random_bytes(seed_ptr, offsets, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """8 uniform random bits per element (as fp32): one 32-bit Philox draw per 4 neighbours."""
    group = tl.reshape(offsets // 4, (BLOCK_R, BLOCK_C // 4, 4))
    draws = tl.randint(tl.load(seed_ptr), tl.min(group, axis=2))
    byte = tl.arange(0, 4)[None, None, :] * 8
    return tl.reshape((draws[:, :, None] >> byte) & 0xFF, (BLOCK_R, BLOCK_C)).to(tl.float32)


@triton.jit
def _nvfp4_kernel(x_ptr, amax_ptr, bits_ptr, seed_ptr, out_ptr, rows, cols, COLUMNWISE: tl.constexpr,
                  RHT: tl.constexpr, TILE_ROWS: tl.constexpr, RANDOM: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    # blocks: 16 consecutive elements of a row (1x16, 16x16 tiles) or, COLUMNWISE, of a column,
    # which are the 1x16 blocks of x^T quantized in place (the GEMM reads the transposed view)
    if COLUMNWISE:
        if RHT:
            blocks = _rht_columns(x.to(tl.float32), BLOCK_R, BLOCK_C, x.dtype)
        else:
            blocks = tl.reshape(x.to(tl.float32), (BLOCK_R // 16, 16, BLOCK_C))
        block_amax = tl.max(tl.abs(blocks), axis=1)[:, None, :]
    else:
        blocks = tl.reshape(x.to(tl.float32), (BLOCK_R, BLOCK_C // 16, 16))
        block_amax = tl.max(tl.abs(blocks), axis=2)
        if TILE_ROWS == 16:  # 16x16 tiles: the amax over 16 rows, repeated on each row
            tile_amax = tl.max(tl.reshape(block_amax, (BLOCK_R // 16, 16, BLOCK_C // 16)), axis=1)
            block_amax = tl.reshape(tl.broadcast_to(tile_amax[:, None, :], (BLOCK_R // 16, 16, BLOCK_C // 16)),
                                    (BLOCK_R, BLOCK_C // 16))
        block_amax = block_amax[:, :, None]
    amax = tl.load(amax_ptr)
    # per-tensor scale (TE): 2688 / amax, at most FLT_MAX, 0 (amax = inf) -> 1
    g_enc = tl.minimum(tl.math.div_rn(tl.full([], 2688.0, tl.float32), amax), FLT_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
    g_enc = tl.where(g_enc == 0.0, 1.0, g_enc)
    g_dec = tl.math.div_rn(tl.full([], 1.0, tl.float32), g_enc)
    decode = tl.minimum(block_amax * (g_enc * RECIP_6), FLT_MAX, propagate_nan=tl.PropagateNan.ALL)
    decode = tl.clamp(decode, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    scale = _round_e4m3(decode)
    encode = tl.minimum(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale * g_dec), FLT_MAX,
                        propagate_nan=tl.PropagateNan.ALL)
    v = tl.clamp(blocks * encode, -6.0, 6.0, propagate_nan=tl.PropagateNan.ALL)
    a = tl.abs(v)
    if RANDOM == NO_RANDOM:
        q = _round_half_even(a * _e2m1_inv_step(a)) * _e2m1_step(a)
    else:  # TE's software rounder: t = |x| + u * step(|x|), floor to the grid at t
        if RANDOM == RANDOM_BITS:
            bits = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.float32)
        else:
            bits = _random_bytes(seed_ptr, offsets, BLOCK_R, BLOCK_C)
        t = a + tl.reshape(bits, v.shape) * (1.0 / 256.0) * _e2m1_step(a)
        q = tl.minimum(tl.floor(t * _e2m1_inv_step(t)) * _e2m1_step(t), 6.0)
    q = tl.where(v < 0, q * -1.0, q)  # not -q: Triton negates as 0 - q, which loses -0.0
    values = tl.reshape(q * scale, (BLOCK_R, BLOCK_C))
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rht_amax_kernel(x_ptr, amax_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """amax_ptr (zeroed) <- max |RHT(x^T)|, NaN if any is NaN."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
    a = tl.abs(_rht_columns(x.to(tl.float32), BLOCK_R, BLOCK_C, x.dtype))
    a = tl.reshape(a, (BLOCK_R * BLOCK_C,))
    has_nan = tl.sum((a != a).to(tl.int32), axis=0) > 0
    tl.atomic_max(amax_ptr, tl.where(has_nan, float("nan"), tl.max(a, axis=0)))


def launch(x: torch.Tensor, amax: torch.Tensor, out: torch.Tensor, tile_rows: int = 1, columnwise: bool = False,
           rht: bool = False, bits=None, seed=None, launcher=None):
    """Quantize a contiguous 2D x (cols % 16 == 0; columnwise: rows % 16 == 0) into `out`, in
    x's layout. Columnwise quantizes x^T (RHT(x^T) with rht) in place: out^T is the operand.
    Rounds to nearest, or stochastically with explicit uint8 `bits` (x's shape) or from an int64
    `seed` tensor. `launcher` wraps the kernel for torch.library; default: the raw kernel."""
    rows, cols = x.shape
    block_r, block_c = 32, 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    random = (RANDOM_BITS if bits is not None else RANDOM_SEED if seed is not None else NO_RANDOM).value
    (launcher or _nvfp4_kernel)[grid](x, amax, x if bits is None else bits, x if seed is None else seed, out,
                                      rows, cols, COLUMNWISE=columnwise, RHT=rht, TILE_ROWS=tile_rows,
                                      RANDOM=random, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def launch_rht_amax(x: torch.Tensor, amax: torch.Tensor, launcher=None):
    """amax (fp32, zeroed) <- max |RHT(x^T)| for a contiguous 2D x with rows % 16 == 0."""
    rows, cols = x.shape
    block_r, block_c = 32, 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    (launcher or _rht_amax_kernel)[grid](x, amax, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return amax


@torch.library.triton_op("nvfp4::quantize_values", mutates_args=())
def quantize_values(x: torch.Tensor, amax: torch.Tensor, seed: torch.Tensor, tile_rows: int, columnwise: bool,
                    rht: bool, stochastic: bool) -> torch.Tensor:
    """code * E4M3 scale (exact in bf16) of NVFP4(x), or columnwise of x^T / RHT(x^T) stored in
    x's layout, for a contiguous 2D x. seed: int64 tensor of one element, read when stochastic."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    return launch(x, amax, out, tile_rows, columnwise, rht, seed=seed if stochastic else None,
                  launcher=torch.library.wrap_triton(_nvfp4_kernel))


@torch.library.triton_op("nvfp4::rht_amax", mutates_args=())
def rht_amax(x: torch.Tensor) -> torch.Tensor:
    """max |RHT(x^T)| (fp32 scalar) for a contiguous 2D x with rows % 16 == 0."""
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    return launch_rht_amax(x, amax, launcher=torch.library.wrap_triton(_rht_amax_kernel))
