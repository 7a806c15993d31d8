"""NVFP4 and FP8 formats and quantizers, written from Transformer Engine's recipe.

The specification is TE's reference quantizer
(`transformer_engine/pytorch/custom_recipes/reference_nvfp4.py` and
`reference_current_scaling.py`, TE 2.20) and the NVFP4 paper (arXiv:2509.25149).
Every step below is the same fp32 operation in the same order as TE's reference,
so quantized values match it bit for bit.

A quantized operand is returned as `values` (E2M1 code x E4M3 block scale, or the
FP8 value) plus one fp32 per-tensor factor. `values` have at most 6 significant
bits, so they are exact in bfloat16 and their products are exact in fp32: a bf16
GEMM with fp32 accumulation then computes what the FP4/FP8 tensor cores compute.
"""
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
FP32_MAX = torch.finfo(torch.float32).max
BLOCK = 16
# TE's GEMM folds both operands' global scales into alpha = amax_a * amax_b / (6*6*448*448).
NVFP4_ALPHA_DENOM = E2M1_MAX * E2M1_MAX * E4M3_MAX * E4M3_MAX
# TE's dequantize kernel: scale * amax * (1 / (6 * 448)), the constant rounded to fp32.
NVFP4_DEQUANT_FACTOR = torch.tensor(1.0 / (E2M1_MAX * E4M3_MAX), dtype=torch.float32).item()
# TE's fixed sign vector for the 16-point Random Hadamard Transform of wgrad operands.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


@dataclass(frozen=True)
class NVFP4Recipe:
    """TE's `NVFP4BlockScaling` switches that the emulation implements (TE's names and defaults)."""
    name: ClassVar[str] = "nvfp4"
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False

    def describe(self) -> str:
        return (f"NVFP4 recipe: RHT {'off' if self.disable_rht else 'on'} (wgrad operands), stochastic rounding "
                f"{'off' if self.disable_stochastic_rounding else 'on'} (gradients), weights in "
                f"{'1x16 blocks' if self.disable_2d_quantization else '16x16 tiles'}")


@dataclass(frozen=True)
class FP8Recipe:
    """TE's `Float8CurrentScaling` with Format.HYBRID: E4M3 forward, E5M2 gradients."""
    name: ClassVar[str] = "fp8"


# ---- E2M1 element rounding -------------------------------------------------------------

def _e2m1_step(a: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} at magnitude `a`."""
    return torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))


def _sign(v: torch.Tensor) -> torch.Tensor:
    """-1 where v < 0, else +1: a product keeps -0.0 where Triton's `-q` (0 - q) would not."""
    return torch.where(v < 0, -1.0, 1.0)


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the nearest E2M1 value, ties to even.

    Equals the thresholds of TE's `cast_to_fp4x2` (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); a negative value that rounds to zero keeps its
    sign (-0.0, code 0x8) and -0.0 itself gives +0.0 (code 0x0), as in TE.
    """
    a = v.abs()
    step = _e2m1_step(a)
    q = torch.round(a / step) * step  # torch.round is round-half-to-even
    return q * _sign(v)


def random_bits(shape, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """8 uniform random bits per element (uint8). rand has 24-bit resolution, so
    floor(rand * 256) is exactly uniform on 0..255; unlike randint it compiles for any shape."""
    return (torch.rand(shape, generator=generator, device=device) * 256).to(torch.uint8)


def stochastic_round_e2m1(v: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Stochastically round fp32 values in [-6, 6] to one of their two E2M1 neighbours.

    TE's software rounder (NVIDIA/TransformerEngine#3281, what `cvt.rs.satfinite.e2m1x4.f32`
    takes): 8 random bits per element, u = bits / 256, t = |x| + u * step(|x|),
    q = min(floor(t / step(t)) * step(t), 6), sign restored. Unbiased up to step / 256.
    """
    a = v.abs()
    t = a + bits.to(torch.float32) * (1.0 / 256.0) * _e2m1_step(a)
    step_t = _e2m1_step(t)
    q = torch.clamp(torch.floor(t / step_t) * step_t, max=E2M1_MAX)
    return q * _sign(v)


# ---- Scales --------------------------------------------------------------------------------

def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp32 scale 448 * 6 / amax (TE). amax = 0 gives FP32_MAX (every block then
    has scale 0 and quantizes to 0); amax = inf gives 0, which TE replaces by 1."""
    # torch.div, not `number / tensor`: the latter is reciprocal-then-multiply (one more rounding)
    scale = torch.minimum(torch.div(E4M3_MAX * E2M1_MAX, amax), torch.tensor(FP32_MAX, device=amax.device))
    return torch.where(scale == 0.0, torch.ones_like(scale), scale)


def round_e4m3_scale(decode_scale: torch.Tensor) -> torch.Tensor:
    """Block decode scale to FP8 E4M3 (saturating at 448, round to nearest even, subnormals
    down to 2^-9), returned as fp32."""
    clamped = torch.clamp(torch.minimum(decode_scale, torch.tensor(FP32_MAX, device=decode_scale.device)),
                          -E4M3_MAX, E4M3_MAX)
    return clamped.to(torch.float8_e4m3fn).to(torch.float32)


# ---- Random Hadamard Transform ---------------------------------------------------------------

def hadamard_matrix(device=None, dtype=torch.float32) -> torch.Tensor:
    """TE's RHT matrix: diag(signs) @ Sylvester H16, times 1/sqrt(16). Orthogonal.

    Sylvester's H16[i, j] = (-1)^popcount(i & j). Built with device-side ops only, so that a
    compiled graph holds no CPU tensor."""
    idx = torch.arange(BLOCK, device=device)
    both = idx[:, None] & idx[None, :]
    parity = sum((both >> bit) & 1 for bit in range(4)) % 2
    signs = torch.tensor(RHT_SIGNS, device=device, dtype=torch.float32)
    return (signs[:, None] * (1 - 2 * parity) * 0.25).to(dtype)


def random_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Apply the 16-point RHT along the last dim in x's dtype (as TE's reference does)."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"RHT needs the last dim to be a multiple of {BLOCK}, got {x.shape[-1]}")
    h = hadamard_matrix(x.device, x.dtype)
    return (x.reshape(-1, BLOCK) @ h).reshape(x.shape)


# ---- NVFP4 quantization ---------------------------------------------------------------------

class NVFP4Tensor(NamedTuple):
    """A 2D NVFP4 tensor in emulation: E2M1 codes, E4M3 block scales (both as fp32) and amax."""
    codes: torch.Tensor   # [rows, cols] E2M1 values (signed), padding removed
    scales: torch.Tensor  # [rows, cols_padded // 16] E4M3 decode scales
    amax: torch.Tensor    # fp32 scalar: the per-tensor amax TE's GEMM alpha uses

    def values(self) -> torch.Tensor:
        """code * block scale: exact in fp32 and in bf16 (the GEMM operand)."""
        return (self._blocked(self.codes) * self.scales[..., None]).flatten(1)[:, :self.codes.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """TE's dequantize kernel: code * (scale * amax * (1 / 2688)), in fp32."""
        factor = self.scales * self.amax * NVFP4_DEQUANT_FACTOR
        return (self._blocked(self.codes) * factor[..., None]).flatten(1)[:, :self.codes.shape[1]]

    def _blocked(self, t: torch.Tensor) -> torch.Tensor:
        pad = self.scales.shape[1] * BLOCK - t.shape[1]
        return torch.nn.functional.pad(t, (0, pad)).view(t.shape[0], -1, BLOCK)


def _block_amax(x: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """amax of each 1x16 block, or of each 16x16 tile repeated over its 16 rows."""
    rows, cols = x.shape
    a = x.abs().view(rows, cols // BLOCK, BLOCK).amax(-1)
    if tile_rows == 1:
        return a
    a = a.view(rows // tile_rows, tile_rows, -1).amax(1)
    return a.repeat_interleave(tile_rows, dim=0)


def quantize_nvfp4(x: torch.Tensor, tile_rows: int = 1, stochastic: bool = False,
                   generator: Optional[torch.Generator] = None, bits: Optional[torch.Tensor] = None) -> NVFP4Tensor:
    """Quantize a 2D tensor to NVFP4 along its last dim, step for step as TE's reference:
    1x16 blocks (tile_rows=1) or 16x16 tiles (tile_rows=16), zero padding to the tile.
    stochastic: round with `bits` (uint8, x's shape), drawn from `generator` when not given."""
    if x.dim() != 2:
        raise ValueError(f"quantize_nvfp4 expects a 2D tensor, got shape {tuple(x.shape)}")
    if tile_rows not in (1, BLOCK):
        raise ValueError(f"tile_rows must be 1 or {BLOCK}, got {tile_rows}")
    rows, cols = x.shape
    amax = x.abs().amax().to(torch.float32) if x.numel() else torch.zeros((), device=x.device)
    padded = torch.nn.functional.pad(x, (0, -cols % BLOCK, 0, -rows % tile_rows))
    g_enc = global_encode_scale(amax)
    g_dec = torch.div(1.0, g_enc)
    multiplier = g_enc * torch.reciprocal(torch.tensor(E2M1_MAX, device=x.device))
    block_amax = _block_amax(padded, tile_rows).to(torch.float32)
    scales = round_e4m3_scale(block_amax * multiplier)
    encode = torch.minimum(torch.div(1.0, scales * g_dec), torch.tensor(FP32_MAX, device=x.device))
    blocks = padded.to(torch.float32).view(padded.shape[0], -1, BLOCK) * encode[..., None]
    blocks = torch.clamp(blocks, -E2M1_MAX, E2M1_MAX)
    if stochastic:
        bits = random_bits(x.shape, x.device, generator) if bits is None else bits
        bits = torch.nn.functional.pad(bits, (0, -cols % BLOCK, 0, -rows % tile_rows))
        codes = stochastic_round_e2m1(blocks, bits.view(blocks.shape))
    else:
        codes = round_e2m1(blocks)
    codes = codes.flatten(1)[:rows, :cols]
    return NVFP4Tensor(codes, scales[:rows], amax)


def fake_quantize(x: torch.Tensor, tile=(1, 16), rht: bool = False, stochastic: bool = False,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Quantize to NVFP4 and dequantize (TE's dequantize), along the last dim.

    tile: (1, 16) blocks or (16, 16) tiles over the flattened leading dims. rht=True first
    applies TE's 16-point Random Hadamard Transform along the last dim and returns values in
    the transformed space, as TE quantizes the wgrad operands. Same shape and dtype as x.
    """
    tile = tuple(tile)
    if tile not in ((1, BLOCK), (BLOCK, BLOCK)):
        raise ValueError(f"tile must be (1, 16) or (16, 16), got {tile}")
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rht:
        flat = random_hadamard_transform(flat)
    q = quantize_nvfp4(flat, tile_rows=tile[0], stochastic=stochastic, generator=generator)
    return q.dequantize().to(x.dtype).reshape(x.shape)


# ---- FP8 current scaling (TE's Float8CurrentScaling reference) -----------------------------

class FP8Tensor(NamedTuple):
    values: torch.Tensor     # the FP8 values, as fp32 (exact)
    scale_inv: torch.Tensor  # fp32 scalar: dequantized = values * scale_inv


def quantize_fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> FP8Tensor:
    """Per-tensor current scaling: scale = fp8_max / amax (amax = 0 -> 1, inf -> max of x's
    dtype), values = round_to_fp8(x * scale), as TE's `CurrentScalingQuantizerRef`."""
    amax = x.to(torch.float32).abs().amax() if x.numel() else torch.zeros((), device=x.device)
    scale = torch.div(torch.finfo(fp8_dtype).max, amax)
    scale = torch.where(scale == torch.inf, torch.finfo(x.dtype).max, scale)
    scale = torch.where(amax == 0, 1.0, scale)
    values = (x.to(torch.float32) * scale).to(fp8_dtype).to(torch.float32)
    return FP8Tensor(values, torch.reciprocal(scale))
