"""A fused Triton kernel for NVFP4 quantization on GPUs, bitwise equal to formats.quantize_nvfp4.

One program reads a tile of the operand, computes its 1x16 (or 16x16) block amaxes, rounds the
E4M3 block scales, scales, rounds to E2M1 (to nearest even, or stochastically from given random
bits) and writes code * scale as bf16: one read and one write instead of inductor's dozens of
kernels per GEMM operand (which also took minutes to compile for the whole model).

Exactness: every step is the fp32 operation of formats.quantize_nvfp4 (IEEE division via
div_rn; power-of-two scalings are exact), and round-to-nearest-even is the (y + 2^23) - 2^23
identity, valid here because 0 <= y < 2^22. tests/test_kernels.py checks it bit for bit, on the
GPU and through Triton's CPU interpreter.
"""
import torch
import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)
RECIP_6 = tl.constexpr(0.1666666716337204)  # torch.reciprocal(6.0) in fp32, as TE's reference multiplies by it
RNE_MAGIC = tl.constexpr(8388608.0)  # 2^23


@triton.jit
def _round_half_even(y):
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def _e2m1_step(a):
    return tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))


@triton.jit
def _round_e4m3(s):
    """Non-negative fp32 (<= 448) to the nearest E4M3 value, ties to even, subnormals at 2^-9."""
    exponent = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    return _round_half_even(s / quantum) * quantum


@triton.jit
def _nvfp4_kernel(x_ptr, amax_ptr, bits_ptr, out_ptr, rows, cols,
                  TILE_ROWS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    amax = tl.load(amax_ptr)
    # per-tensor scale (TE): 2688 / amax, at most FLT_MAX, 0 (amax = inf) -> 1
    g_enc = tl.minimum(tl.math.div_rn(tl.full([], 2688.0, tl.float32), amax), FLT_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
    g_enc = tl.where(g_enc == 0.0, 1.0, g_enc)
    g_dec = tl.math.div_rn(tl.full([], 1.0, tl.float32), g_enc)
    multiplier = g_enc * RECIP_6
    blocks = tl.reshape(x, (BLOCK_R, NB, 16))
    block_amax = tl.max(tl.abs(blocks), axis=2)
    if TILE_ROWS == 16:  # 16x16 tiles: the amax over 16 rows, repeated on each row
        tile_amax = tl.max(tl.reshape(block_amax, (BLOCK_R // 16, 16, NB)), axis=1)
        block_amax = tl.reshape(tl.broadcast_to(tile_amax[:, None, :], (BLOCK_R // 16, 16, NB)), (BLOCK_R, NB))
    decode = tl.minimum(block_amax * multiplier, FLT_MAX, propagate_nan=tl.PropagateNan.ALL)
    decode = tl.clamp(decode, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    scale = _round_e4m3(decode)
    encode = tl.minimum(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale * g_dec), FLT_MAX,
                        propagate_nan=tl.PropagateNan.ALL)
    v = tl.clamp(blocks * encode[:, :, None], -6.0, 6.0, propagate_nan=tl.PropagateNan.ALL)
    a = tl.abs(v)
    if STOCHASTIC:  # TE's software rounder: t = |x| + u * step(|x|), floor to the grid at t
        bits = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.float32)
        t = a + tl.reshape(bits, (BLOCK_R, NB, 16)) * (1.0 / 256.0) * _e2m1_step(a)
        step_t = _e2m1_step(t)
        q = tl.minimum(tl.floor(t / step_t) * step_t, 6.0)
    else:
        step = _e2m1_step(a)
        q = _round_half_even(a / step) * step
    q = tl.where(v < 0, q * -1.0, q)  # not -q: Triton negates as 0 - q, which loses -0.0
    values = tl.reshape(q * scale[:, :, None], (BLOCK_R, BLOCK_C))
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, amax: torch.Tensor, bits, out: torch.Tensor, tile_rows: int, launcher=None):
    """Run the kernel over a contiguous 2D x (cols % 16 == 0); `launcher` wraps it for
    torch.library (wrap_triton) or is the raw kernel."""
    rows, cols = x.shape
    block_r, block_c = 32, 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    (launcher or _nvfp4_kernel)[grid](x, amax, x if bits is None else bits, out, rows, cols,
                                      TILE_ROWS=tile_rows, STOCHASTIC=bits is not None,
                                      BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


@torch.library.triton_op("nvfp4::quantize_values", mutates_args=())
def quantize_values(x: torch.Tensor, amax: torch.Tensor, bits: torch.Tensor, tile_rows: int,
                    stochastic: bool) -> torch.Tensor:
    """code * E4M3 scale of NVFP4(x) as bf16 (exact), x contiguous 2D with cols % 16 == 0.
    bits: uint8 random bits of x's shape, read when stochastic."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    return launch(x, amax, bits if stochastic else None, out, tile_rows, torch.library.wrap_triton(_nvfp4_kernel))
