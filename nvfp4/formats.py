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
import os
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
FP32_MAX = torch.finfo(torch.float32).max
BLOCK = 16


def alpha_denom(e4m3_max_a: int = 448, e4m3_max_b: int = 448) -> float:
    """TE's GEMM folds both operands' global scales into alpha = amax_a * amax_b / this
    (6 * 6 * 448 * 448; a 4over6 operand with the 256 bound puts 256 in its place)."""
    return E2M1_MAX * E2M1_MAX * e4m3_max_a * e4m3_max_b


NVFP4_ALPHA_DENOM = alpha_denom()
# TE's fixed sign vector for the 16-point Random Hadamard Transform of wgrad operands.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


# The forms a quantized copy is made in (bit flags): its exact GEMM values (code x E4M3 scale), and
# TE's bytes (packed E2M1 codes and E4M3 scale bytes)
VALUES, PACKED = 1, 2
SCOPES = ("none", "weights", "activations", "all")  # TE's _NVFP4_4OVER6_SCOPES
FOUR_OVER_SIX_ERR_MODES = ("MAE", "MSE")
BACKWARD_OVERRIDES = (None, "high_precision", "dequantized")
E4M3_MAXES = (448, 256)  # the global scale's E4M3 bound: 448, or 256 for 4over6 tensors


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class NVFP4Quantizer:
    """How one GEMM operand is quantized (TE's NVFP4Quantizer arguments): tile_rows 1 (1x16
    blocks) or 16 (16x16 tiles); rht on the columnwise copy; stochastic rounding; row_scaled
    (one fp32 amax per row of each copy); four_over_six None or its error mode ("MAE", "MSE");
    e4m3_max of the global scale (256 only with four_over_six)."""
    tile_rows: int = 1
    rht: bool = False
    stochastic: bool = False
    row_scaled: bool = False
    four_over_six: Optional[str] = None
    e4m3_max: int = 448


@dataclass(frozen=True)
class NVFP4Recipe:
    """TE 2.20's `NVFP4BlockScaling`: every field, TE's names, values and defaults.

    disable_rht / disable_stochastic_rounding / disable_2d_quantization switch off RHT (of the
    wgrad operands), stochastic rounding (of gradients) and 16x16 weight tiles.
    row_scaled_activation: the forward input's copies carry one amax per row.
    nvfp4_4over6 (none / weights / activations / all): which forward operands choose, per block,
    the better of map-to-6 and map-to-4 (Four Over Six, arXiv:2512.02010) by
    nvfp4_4over6_err_mode (MAE / MSE); gradients never do. nvfp4_4over6_e4m3_use_256: which of
    those use 256 instead of 448 as the global scale's E4M3 bound. backward_override: None,
    "high_precision" (dgrad and wgrad from the unquantized operands) or "dequantized" (from the
    forward's dequantized rowwise copies); gradients are then not quantized.
    TE refuses 4over6 with RHT on the same quantizer (`NVFP4BlockScalingRecipeState`), so does this.
    """
    name: ClassVar[str] = "nvfp4"
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    row_scaled_activation: bool = False
    nvfp4_4over6: str = "none"
    nvfp4_4over6_e4m3_use_256: str = "all"
    nvfp4_4over6_err_mode: str = "MAE"
    backward_override: Optional[str] = None

    def __post_init__(self):
        _check_choice("nvfp4_4over6", self.nvfp4_4over6, SCOPES)
        _check_choice("nvfp4_4over6_e4m3_use_256", self.nvfp4_4over6_e4m3_use_256, SCOPES)
        _check_choice("nvfp4_4over6_err_mode", self.nvfp4_4over6_err_mode, FOUR_OVER_SIX_ERR_MODES)
        _check_choice("backward_override", self.backward_override, BACKWARD_OVERRIDES)
        if self.nvfp4_4over6 in ("activations", "all") and not self.disable_rht:
            raise ValueError(f"nvfp4_4over6={self.nvfp4_4over6!r} needs disable_rht: the input's quantizer "
                             "applies RHT, and TE 2.20 has no RHT + 4over6 quantization")

    def quantizer(self, kind: str) -> NVFP4Quantizer:
        """The quantizer of operand `kind` (x: the input, w: the weight, dy: the output gradient),
        as TE's `NVFP4BlockScalingRecipeState.make_quantizers` builds it."""
        scope = "weights" if kind == "w" else "activations"
        four_over_six = kind != "dy" and self.nvfp4_4over6 in (scope, "all")
        use_256 = four_over_six and self.nvfp4_4over6_e4m3_use_256 in (scope, "all")
        return NVFP4Quantizer(
            tile_rows=16 if kind == "w" and not self.disable_2d_quantization else 1,
            rht=kind != "w" and not self.disable_rht,
            stochastic=kind == "dy" and not self.disable_stochastic_rounding,
            row_scaled=kind == "x" and self.row_scaled_activation,
            four_over_six=self.nvfp4_4over6_err_mode if four_over_six else None,
            e4m3_max=256 if use_256 else 448)

    def describe(self) -> str:
        line = (f"NVFP4 recipe: RHT {'off' if self.disable_rht else 'on'} (wgrad operands), stochastic rounding "
                f"{'off' if self.disable_stochastic_rounding else 'on'} (gradients), weights in "
                f"{'1x16 blocks' if self.disable_2d_quantization else '16x16 tiles'}")
        if self.row_scaled_activation:
            line += ", row-scaled inputs"
        if self.nvfp4_4over6 != "none":
            line += (f", 4over6 on {self.nvfp4_4over6} ({self.nvfp4_4over6_err_mode}, E4M3 bound 256 on "
                     f"{self.nvfp4_4over6_e4m3_use_256})")
        if self.backward_override:
            line += f", backward {self.backward_override}"
        return line


# TE 2.20 takes these recipe defaults from the environment (common/recipe/__init__.py): a switch
# is on where its variable is "1", the 4over6 error mode is upper-cased, NVTE_BACKWARD_OVERRIDE
# applies to every quantized recipe.
NVFP4_ENVIRONMENT = {"disable_rht": "NVTE_NVFP4_DISABLE_RHT",
                     "disable_stochastic_rounding": "NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING",
                     "disable_2d_quantization": "NVTE_NVFP4_DISABLE_2D_QUANTIZATION",
                     "row_scaled_activation": "NVTE_NVFP4_ROW_SCALED_ACTIVATION", "nvfp4_4over6": "NVTE_NVFP4_4OVER6",
                     "nvfp4_4over6_e4m3_use_256": "NVTE_NVFP4_4OVER6_E4M3_USE_256",
                     "nvfp4_4over6_err_mode": "NVTE_NVFP4_4OVER6_ERR_MODE", "backward_override": "NVTE_BACKWARD_OVERRIDE"}


def recipe_environment(precision: str, environ=None) -> dict:
    """{field: (value, "NAME=raw")} of the recipe fields of `precision` ("fp8" or "nvfp4") that TE
    2.20 would take from environment variables set in `environ` (default: os.environ), parsed as
    TE parses them. Raises ValueError, naming the variable, for a value TE's recipe refuses."""
    environ = os.environ if environ is None else environ
    names = NVFP4_ENVIRONMENT if precision == "nvfp4" else (
        {"backward_override": "NVTE_BACKWARD_OVERRIDE"} if precision == "fp8" else {})
    found = {}
    for field, name in names.items():
        if name not in environ:
            continue
        raw = environ[name]
        if field in ("nvfp4_4over6", "nvfp4_4over6_e4m3_use_256"):
            value, choices = raw, SCOPES
        elif field == "nvfp4_4over6_err_mode":
            value, choices = raw.upper(), FOUR_OVER_SIX_ERR_MODES
        elif field == "backward_override":
            value, choices = raw, BACKWARD_OVERRIDES[1:]
        else:
            value, choices = raw == "1", None
        if choices is not None and value not in choices:
            raise ValueError(f"{name} must be unset or one of {', '.join(choices)}, got {raw!r}")
        found[field] = (value, f"{name}={raw}")
    return found


@dataclass(frozen=True)
class FP8Recipe:
    """TE's `Float8CurrentScaling` with Format.HYBRID: E4M3 forward, E5M2 gradients;
    backward_override as in NVFP4Recipe. The emulation multiplies the FP8 values on bf16 tensor
    cores (exact: an FP8 value is a bf16 value)."""
    name: ClassVar[str] = "fp8"
    native: ClassVar[bool] = False
    backward_override: Optional[str] = None

    def __post_init__(self):
        _check_choice("backward_override", self.backward_override, BACKWARD_OVERRIDES)


@dataclass(frozen=True)
class NativeFP8Recipe(FP8Recipe):
    """FP8Recipe with its three GEMMs on FP8 tensor cores (torch._scaled_mm: sm_89 and newer), as
    TE runs Float8CurrentScaling on Hopper: the same E4M3/E5M2 operands and scales; cuBLAS sums
    the products (fp32 accumulation) and applies scale_inv_a * scale_inv_b in its epilogue. Not
    a TE field: TE always runs FP8 natively."""
    native: ClassVar[bool] = True


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

def global_encode_scale(amax: torch.Tensor, e4m3_max: int = 448) -> torch.Tensor:
    """Per-tensor (or per-row) fp32 scale e4m3_max * 6 / amax (TE). amax = 0 gives FP32_MAX
    (every block then has scale 0 and quantizes to 0); amax = inf gives 0, which TE replaces by 1."""
    # torch.div, not `number / tensor`: the latter is reciprocal-then-multiply (one more rounding)
    scale = torch.minimum(torch.div(float(e4m3_max) * E2M1_MAX, amax), torch.tensor(FP32_MAX, device=amax.device))
    return torch.where(scale == 0.0, torch.ones_like(scale), scale)


# TE's dequantize constant 1 / (6 * e4m3_max), rounded to fp32; computed once (no .item() in a graph)
DEQUANT_FACTORS = {m: torch.tensor(1.0 / (E2M1_MAX * m), dtype=torch.float32).item() for m in E4M3_MAXES}


def dequant_factor(e4m3_max: int = 448) -> float:
    """TE's dequantize constant 1 / (6 * e4m3_max), rounded to fp32."""
    return DEQUANT_FACTORS[e4m3_max]


def dequant_scale(scales: torch.Tensor, amax: torch.Tensor, e4m3_max: int = 448) -> torch.Tensor:
    """The per-block factor of TE's dequantize kernel, (scale * amax) * (1 / (6 * e4m3_max)), in
    fp32. Where scale * amax overflows (amax near FLT_MAX: TE's kernel then writes inf, and NaN
    for zero codes) it is scale * (amax * (1 / (6 * e4m3_max))) instead, which is finite."""
    factor = dequant_factor(e4m3_max)
    product = scales * amax
    return torch.where(torch.isinf(product) & torch.isfinite(amax), scales * (amax * factor), product * factor)


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
    scales: torch.Tensor  # [rows (16x16 tiles: padded to 16), cols_padded // 16] E4M3 decode scales, TE's shape
    amax: torch.Tensor    # fp32: the amax TE's GEMM alpha uses, a scalar or (row-scaled) one per row
    e4m3_max: int = 448   # the global scale's E4M3 bound (256: 4over6 tensors that use it)

    def values(self) -> torch.Tensor:
        """code * block scale: exact in fp32 and in bf16 (the GEMM operand)."""
        return (self._blocked(self.codes) * self._row_scales()[..., None]).flatten(1)[:, :self.codes.shape[1]]

    def row_amax(self) -> torch.Tensor:
        """amax shaped to broadcast over rows: a scalar, or [rows, 1] when row-scaled."""
        return self.amax[:, None] if self.amax.dim() else self.amax

    def dequantize(self) -> torch.Tensor:
        """TE's dequantize kernel: code * (scale * amax * (1 / (6 * e4m3_max))), in fp32
        (finite where TE's overflows, see dequant_scale)."""
        factor = dequant_scale(self._row_scales(), self.row_amax(), self.e4m3_max)
        return (self._blocked(self.codes) * factor[..., None]).flatten(1)[:, :self.codes.shape[1]]

    def packed(self) -> tuple:
        """TE's bytes, in the shapes of TE's reference: (data, scale) as TE's NVFP4 tensors store
        them, data uint8 [rows, cols // 2] with two E2M1 codes a byte (even column in the low
        nibble; 0-7 for +0 ... +6, 8-15 for -0 ... -6; NaN as 0, as TE's cast; an odd last column
        is dropped, as TE's reference packs pairs: TE's kernels take even widths only), scale
        float8_e4m3fn [rows, blocks] (16x16 tiles: rows padded to 16, each tile's scale on its
        padded rows too)."""
        return pack_e2m1(self.codes)[:, :self.codes.shape[1] // 2], self.scales.to(torch.float8_e4m3fn)

    def _row_scales(self) -> torch.Tensor:
        """The scales of the codes' rows (a 16x16 tile's padded rows left out)."""
        return self.scales[:self.codes.shape[0]]

    def _blocked(self, t: torch.Tensor) -> torch.Tensor:
        pad = self.scales.shape[1] * BLOCK - t.shape[1]
        return torch.nn.functional.pad(t, (0, pad)).view(t.shape[0], -1, BLOCK)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Signed E2M1 values [rows, cols] -> uint8 [rows, ceil(cols / 2)], TE's nibble order and codes."""
    a = codes.abs().nan_to_num(0.0)
    magnitude = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4))  # 0, .5, ..., 6 -> 0 ... 7
    nibble = (magnitude + 8 * (torch.signbit(codes) & ~codes.isnan())).to(torch.uint8)
    nibble = torch.nn.functional.pad(nibble, (0, codes.shape[1] % 2))
    return nibble[:, ::2] | (nibble[:, 1::2] << 4)


def unpack_e2m1(data: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_e2m1: uint8 [rows, ceil(cols / 2)] -> signed E2M1 values [rows, cols]
    (fp32). Elementwise arithmetic on each code's byte (no table lookup, no stacked halves), so
    that inductor makes one kernel of it and of the scale multiply after it."""
    rows = data.shape[0]
    pairs = data[:, :, None].expand(rows, data.shape[1], 2).reshape(rows, -1)[:, :cols]
    shift = (torch.arange(cols, device=data.device) % 2 * 4).to(torch.uint8)  # even column: low nibble
    nibble = (pairs >> shift) & 0xF
    m = (nibble & 7).to(torch.float32)  # 0 ... 7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6
    magnitude = torch.where(m < 4, m * 0.5, torch.where(m < 6, m - 2, (m - 4) * 2))
    return torch.where(nibble >= 8, -magnitude, magnitude)


def _block_amax(x: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """amax of each 1x16 block, or of each 16x16 tile repeated over its 16 rows."""
    rows, cols = x.shape
    a = x.abs().view(rows, cols // BLOCK, BLOCK).amax(-1)
    if tile_rows == 1:
        return a
    a = a.view(rows // tile_rows, tile_rows, -1).amax(1)
    return a.repeat_interleave(tile_rows, dim=0)


def _tensor_amax(x: torch.Tensor, row_scaled: bool) -> torch.Tensor:
    """max |x| in fp32: of the tensor, or of each row (row-scaled). TE's reference's own ops
    (torch.max, not amax), so that a NaN amax has TE's bit pattern too (torch's CPU max of fp32
    writes 0xffffffff, where amax writes 0x7fc00000)."""
    if row_scaled:
        return (torch.max(torch.abs(x), dim=1).values.to(torch.float32) if x.shape[1]
                else torch.zeros(x.shape[0], device=x.device))
    return torch.max(torch.abs(x)).to(torch.float32) if x.numel() else torch.zeros((), device=x.device)


def _check_quantizer(tile_rows, stochastic, four_over_six, e4m3_max, row_scaled) -> Optional[str]:
    if tile_rows not in (1, BLOCK):
        raise ValueError(f"tile_rows must be 1 or {BLOCK}, got {tile_rows}")
    if four_over_six is not None:
        _check_choice("four_over_six", four_over_six.upper(), FOUR_OVER_SIX_ERR_MODES)
        if stochastic:
            raise ValueError("four_over_six rounds to nearest: TE has no 4over6 with stochastic rounding")
    _check_choice("e4m3_max", e4m3_max, E4M3_MAXES)
    if e4m3_max != 448 and four_over_six is None:
        raise ValueError("e4m3_max=256 applies to 4over6 tensors only (TE uses 448 otherwise)")
    if row_scaled and tile_rows != 1:
        raise ValueError("row_scaled needs 1x16 blocks (TE: row-scaled NVFP4 has no 16x16 tiles)")
    return four_over_six.upper() if four_over_six else None


def quantize_nvfp4(x: torch.Tensor, tile_rows: int = 1, stochastic: bool = False,
                   generator: Optional[torch.Generator] = None, bits: Optional[torch.Tensor] = None,
                   four_over_six: Optional[str] = None, e4m3_max: int = 448,
                   row_scaled: bool = False) -> NVFP4Tensor:
    """Quantize a 2D tensor to NVFP4 along its last dim, step for step as TE's reference:
    1x16 blocks (tile_rows=1) or 16x16 tiles (tile_rows=16), zero padding to the tile.
    stochastic: round with `bits` (uint8, x's shape), drawn from `generator` when not given.
    four_over_six: None, or "MAE" / "MSE": per block (16x16 tile), keep whichever of map-to-6
    and map-to-4 has the smaller error (ties: map-to-6). e4m3_max: 448, or 256 (4over6 only).
    row_scaled: amax is a vector, one fp32 value per row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_nvfp4 expects a 2D tensor, got shape {tuple(x.shape)}")
    four_over_six = _check_quantizer(tile_rows, stochastic, four_over_six, e4m3_max, row_scaled)
    rows, cols = x.shape
    amax = _tensor_amax(x, row_scaled)
    row_amax = amax[:, None, None] if row_scaled else amax.view(1)  # TE: (rows, 1, 1), or (1,)
    padded = torch.nn.functional.pad(x, (0, -cols % BLOCK, 0, -rows % tile_rows))
    g_enc = global_encode_scale(row_amax, e4m3_max)
    g_dec = torch.div(1.0, g_enc)
    # per-block values as [rows, blocks, 1], TE's vec_max shape: torch's CPU kernels write a NaN's
    # bits by shape (vectorized min on a contiguous dim: 0xffffffff), and this keeps TE's
    block_amax = _block_amax(padded, tile_rows).to(torch.float32)[..., None]
    blocks = padded.to(torch.float32).view(padded.shape[0], -1, BLOCK)
    if four_over_six:
        codes, scales = _four_over_six(blocks, block_amax, row_amax, g_enc, g_dec, four_over_six, e4m3_max, tile_rows)
        return NVFP4Tensor(codes.flatten(1)[:rows, :cols], scales[:, :, 0], amax, e4m3_max)
    multiplier = g_enc * torch.reciprocal(torch.tensor(E2M1_MAX, device=x.device))
    scales = round_e4m3_scale(block_amax * multiplier)
    blocks = _scale_to_e2m1(blocks, scales, g_dec)
    scales = scales[..., 0]
    if stochastic:
        bits = random_bits(x.shape, x.device, generator) if bits is None else bits
        bits = torch.nn.functional.pad(bits, (0, -cols % BLOCK, 0, -rows % tile_rows))
        codes = stochastic_round_e2m1(blocks, bits.view(blocks.shape))
    else:
        codes = round_e2m1(blocks)
    codes = codes.flatten(1)[:rows, :cols]
    return NVFP4Tensor(codes, scales, amax)  # scales of padded rows kept, TE's shape


def _scale_to_e2m1(blocks: torch.Tensor, scales: torch.Tensor, g_dec: torch.Tensor) -> torch.Tensor:
    """blocks * encode, clamped to [-6, 6], where encode = min(1 / (scale * g_dec), FLT_MAX) (TE);
    scales [rows, blocks, 1]."""
    encode = torch.minimum(torch.div(1.0, scales * g_dec), torch.tensor(FP32_MAX, device=blocks.device))
    return torch.clamp(blocks * encode, -E2M1_MAX, E2M1_MAX)


def _four_over_six(blocks, block_amax, amax, g_enc, g_dec, err_mode: str, e4m3_max: int, tile_rows: int):
    """(codes, scales) of 4over6 (TE's `_quantize_blockwise_4over6_reference`): map-to-6 takes
    the block scale (block_amax / 6) * g_enc, map-to-4 1.5 times it (its block max lands on 4);
    each candidate's error sums, element by element in order, |v - x| (MAE) or (v - x)^2 (MSE)
    of its dequantized values v = (code * scale * amax) / (6 * e4m3_max); 16x16 tiles add their
    16 rows' errors in TE's tree order; map-to-4 wins only where its error is smaller."""
    # a divisor tensor, as TE's: torch divides by a Python number through its reciprocal on CUDA
    base = torch.div(block_amax, torch.tensor(E2M1_MAX, device=blocks.device)) * g_enc
    denom = torch.tensor(E2M1_MAX * e4m3_max, device=blocks.device)
    candidates = []
    # TE's 4over6 path clamps with tensor bounds and no FLT_MAX bound first (which changes only
    # a NaN's bits: torch's vectorized minimum writes 0xffffffff, TE's sequence keeps 0x7fc00000)
    bound = torch.tensor(E4M3_MAX, device=blocks.device)
    e4m3 = lambda decode: torch.clamp(decode, min=-bound, max=bound).to(torch.float8_e4m3fn).to(torch.float32)
    for scale in (e4m3(base * 1.5), e4m3(base)):  # [rows, blocks, 1]
        codes = round_e2m1(_scale_to_e2m1(blocks, scale, g_dec))
        values = codes * scale
        error = torch.zeros_like(block_amax)
        for i in range(BLOCK):
            diff = (values[..., i:i + 1] * amax) / denom - blocks[..., i:i + 1]
            error = error + (diff * diff if err_mode == "MSE" else diff.abs())
        candidates.append((codes, scale, error))
    (codes4, scale4, error4), (codes6, scale6, error6) = candidates
    if tile_rows != 1:
        error4, error6 = _tile_error(error4[..., 0])[..., None], _tile_error(error6[..., 0])[..., None]
    pick4 = error4 < error6
    return torch.where(pick4, codes4, codes6), torch.where(pick4, scale4, scale6)


def _tile_error(error: torch.Tensor) -> torch.Tensor:
    """Sum the errors of each 16x16 tile's 16 rows in TE's warp-reduction order (8, 4, 2, 1
    apart), repeated over the tile's rows."""
    rows = error.view(-1, BLOCK, error.shape[1])
    while rows.shape[1] > 1:
        half = rows.shape[1] // 2
        rows = rows[:, :half] + rows[:, half:]
    return rows.repeat_interleave(BLOCK, dim=1).view_as(error)


def fake_quantize(x: torch.Tensor, tile=(1, 16), rht: bool = False, stochastic: bool = False,
                  generator: Optional[torch.Generator] = None, four_over_six: Optional[str] = None,
                  e4m3_max: int = 448, row_scaled: bool = False) -> torch.Tensor:
    """Quantize to NVFP4 and dequantize (TE's dequantize), along the last dim.

    tile: (1, 16) blocks or (16, 16) tiles over the flattened leading dims. rht=True first
    applies TE's 16-point Random Hadamard Transform along the last dim and returns values in
    the transformed space, as TE quantizes the wgrad operands. four_over_six, e4m3_max and
    row_scaled as in quantize_nvfp4. Same shape and dtype as x.
    """
    tile = tuple(tile)
    if tile not in ((1, BLOCK), (BLOCK, BLOCK)):
        raise ValueError(f"tile must be (1, 16) or (16, 16), got {tile}")
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rht:
        flat = random_hadamard_transform(flat)
    q = quantize_nvfp4(flat, tile_rows=tile[0], stochastic=stochastic, generator=generator,
                       four_over_six=four_over_six, e4m3_max=e4m3_max, row_scaled=row_scaled)
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
