#!/usr/bin/env python
"""Pretrain a ViT Masked Autoencoder (He et al. 2021) on CIFAR with its linear layers in
NVFP4, FP8 or BF16, and see what 4-bit training costs: losses, pictures, speed, memory.

    python asmae_minimal.py --dataset cifar100 --epochs 150 --batch-size 128 --mask-ratio 0.6 --randaugment
    python asmae_minimal.py --precision nvfp4 --epochs 50
    python asmae_minimal.py --compare bf16,fp8,nvfp4,nvfp4:high-precision-from=0.9 --seeds 0,1,2 --epochs 20

The sections follow the data:
    config         one frozen Config (data, model, precision, optim, run), a flag per field; parsed,
                   resolved and validated once by workbench/cli.py
    data           (workbench/data.py: CIFAR / folder / fake images as uint8 tensors, the loaders)
    model          patchify, the ViT blocks, the MAE
    precision      the linear layers in the run's precision (nvfp4.Precision), GEMM shape check
    train step     optimizer, schedule, compile, the loss guard (workbench/loss_guard.py); one
                   optimizer step (a CUDA graph: workbench/speed.py)
    training loop  epochs, progress, logging (workbench/files.py: RunLog), signals, the precision
                   schedule, FP4 statistics, the summary read back from metrics.jsonl
    outputs        checkpoints (workbench/files.py), reconstruction grids
    workbench      what the workbench package runs with this script's pieces: --compare's training
                   run of a cell, --benchmark's step (--eval: workbench/evaluate.py)
    main           distributed setup, dispatch, exit codes

workbench/ holds what is not one training run (cli, data, evaluate, compare, report, benchmark,
profile, files: run folders and their lock, speed, loss_guard); nvfp4/ the numerics. Neither
imports this script.
"""
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import nvfp4
from workbench import benchmark, cli, compare, files
from workbench.cli import flag
from workbench.data import load_images, make_loader, plain_images, seed_for
from workbench.errors import Interrupted, StopRequest, UsageError
from workbench.evaluate import Finetune, evaluate_checkpoint, reconstruct
from workbench.files import (RunLog, claim_folder, find_checkpoint, latest_checkpoint, load_model_state,
                             make_run_dir, plan_run_dir, read_summary, release_folders, save_checkpoint,
                             set_rng_state, truncate_metrics)
from workbench.loss_guard import LossGuard, NonFiniteLossError
from workbench.schedule import warmup_cosine
from workbench.speed import CUDAGraphed, start_compile_workers, stop_compile_workers

# ============================================================================= config

MODEL_PRESETS = {  # encoder dim x depth (heads), decoder dim x depth (heads), MLP ratios
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
                 decoder_num_heads=4, mlp_ratio=4.0, decoder_mlp_ratio=4.0),
    "small": dict(embed_dim=384, depth=6, num_heads=6, decoder_embed_dim=192, decoder_depth=4,
                  decoder_num_heads=6, mlp_ratio=4.0, decoder_mlp_ratio=2.0),  # the seed script's model
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, mlp_ratio=4.0, decoder_mlp_ratio=4.0),  # MAE ViT-B
}
PRESET_HELP = "; ".join(f"{k}: encoder {v['embed_dim']}x{v['depth']} ({v['num_heads']} heads), decoder "
                        f"{v['decoder_embed_dim']}x{v['decoder_depth']} ({v['decoder_num_heads']} heads)"
                        for k, v in MODEL_PRESETS.items())


@dataclass(frozen=True)
class DataConfig:
    dataset: str = flag("cifar10", "fake: 50,000 random-noise 32x32 labelled images for smoke runs and benchmarks "
                                   "(like --dummy of PyTorch's ImageNet example); folder: every image under "
                                   "--data-root", choices=["cifar10", "cifar100", "fake", "folder"])
    data_root: str = flag("./data", "where CIFAR is downloaded to, or the image folder")
    loader: str = flag("tensor", "tensor: uint8 dataset on the training device, per-sample augmentation there; "
                                 "torchvision: PIL transforms in a DataLoader (the seed script's pipeline)",
                       choices=["tensor", "torchvision"])
    num_workers: int = flag(min(8, os.cpu_count() or 1), "DataLoader workers of --loader torchvision")
    randaugment: bool = flag(False, "add RandAugment(2 ops, magnitude 9)")


@dataclass(frozen=True)
class MAEConfig:
    """The MAE: the dimensions of a MODEL_PRESETS entry, the input geometry and the masking."""
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    decoder_mlp_ratio: float = 4.0
    preset: str = flag("small", f"size preset ({PRESET_HELP})", flag="--model", choices=list(MODEL_PRESETS))
    img_size: int = flag(32, "input resolution (CIFAR is 32; 224 upsamples as the seed did)")
    patch_size: int = flag(4, "ViT patch size")
    mask_ratio: float = flag(0.75, "fraction of patches masked")
    norm_pix_loss: bool = flag(False, "MSE on per-patch normalized pixels")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))


@dataclass(frozen=True)
class PrecisionConfig:
    """The linear layers' GEMM format and how it runs; the NVFP4 switches carry TE's names."""
    precision: Optional[str] = flag(None, "GEMM precision of the linear layers (default: bf16 with AMP, else fp32)",
                                    choices=nvfp4.PRECISIONS)
    amp: Optional[bool] = flag(None, "autocast activations to bf16 (fp16 + GradScaler where bf16 is missing); "
                                     "default on GPU", off="run activations in fp32")
    backend: str = flag("auto", "auto: Transformer Engine where it imports and the GPU runs the recipe, else "
                                "emulation (fp8: with FP8 tensor-core GEMMs on sm_89+); emulated: bf16 GEMMs",
                        choices=["auto", "te", "emulated"])
    disable_rht: bool = flag(False, "NVFP4: no Random Hadamard Transform (TE disable_rht)", flag="--no-rht")
    disable_stochastic_rounding: bool = flag(False, "NVFP4: round gradients to nearest (TE "
                                                    "disable_stochastic_rounding)", flag="--no-stochastic-rounding")
    disable_2d_quantization: bool = flag(False, "NVFP4: 1x16 blocks for weights too (TE disable_2d_quantization)",
                                         flag="--no-2d-weights")
    row_scaled_activation: bool = flag(False, "NVFP4: one amax per row of the input's copies (TE "
                                              "row_scaled_activation)")
    nvfp4_4over6: str = flag("none", "NVFP4: these forward operands take, per block, the better of map-to-6 and "
                                     "map-to-4 (Four Over Six, arXiv:2512.02010); activations and all need --no-rht "
                                     "(TE nvfp4_4over6)", choices=nvfp4.SCOPES)
    nvfp4_4over6_e4m3_use_256: str = flag("all", "NVFP4: which 4over6 operands bound the global scale's E4M3 by 256, "
                                                 "not 448 (TE nvfp4_4over6_e4m3_use_256)", choices=nvfp4.SCOPES)
    nvfp4_4over6_err_mode: str = flag("MAE", "NVFP4: the error 4over6 compares (TE nvfp4_4over6_err_mode)",
                                      choices=nvfp4.FOUR_OVER_SIX_ERR_MODES)
    backward_override: Optional[str] = flag(None, "fp8/nvfp4: dgrad and wgrad unquantized, from the original "
                                                  "operands or from the forward's dequantized copies (TE "
                                                  "backward_override)", choices=["high_precision", "dequantized"])
    high_precision_from: Optional[float] = flag(None, "fp8/nvfp4: from this fraction of the steps on, the linear "
                                                      "layers run unquantized in the AMP dtype (0.9: the last 10%%; "
                                                      "NVFP4 paper, arXiv:2509.25149, appendix D)", metavar="FRACTION")
    keep_high_precision: tuple = flag(("patch_embed", "decoder_pred"), "comma-separated layer-name patterns kept in "
                                      "BF16 under fp8/nvfp4 ('' keeps none); the NVFP4 recipe keeps the most "
                                      "sensitive first and last layers in high precision", metavar="PATTERNS")
    fp4_stats: bool = flag(False, "log per-layer NVFP4 diagnostics (flushed-to-zero, at-block-max, scale range, "
                                  "error)")
    # the recipe fields taken from TE's NVTE_* environment variables (a flag given wins), "NAME=value"
    from_environment: tuple = ()


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = flag(50, "training epochs")
    batch_size: Optional[int] = flag(None, "global batch size (default: 256 on GPU, 32 on CPU)")
    blr: float = flag(1.5e-4, "base learning rate: lr = blr x batch size / 256")
    lr: Optional[float] = flag(None, "absolute learning rate (overrides --blr)")
    warmup_epochs: float = flag(5.0, "linear warmup, then cosine decay to 0 (per step)")
    weight_decay: float = flag(0.05, "AdamW weight decay (not on biases and norms)")

    @property
    def peak_lr(self) -> float:
        """--lr, or MAE's linear scaling rule blr x batch / 256 (global batch)."""
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


@dataclass(frozen=True)
class RunConfig:
    seed: int = flag(0, "seeds data order, augmentation, masking and weights")
    device: str = flag("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    compile: Optional[bool] = flag(None, "torch.compile the model and augment.py's ops (default on GPU)",
                                   off="run eagerly")
    out_dir: str = flag("runs", "runs go to OUT_DIR/RUN_NAME/, the latest recon grid to OUT_DIR/recons/")
    run_name: Optional[str] = flag(None, "default: dataset-model-precision-timestamp")
    overwrite: bool = flag(False, "replace an existing --run-name folder")
    log_every: int = flag(50, "steps between metrics lines")
    save_every: int = flag(10, "epochs between checkpoints (and one at the end)")
    keep_last: int = flag(3, "checkpoints kept")
    max_bad_steps: int = flag(20, "consecutive non-finite steps that stop the run")
    use_wandb: bool = flag(False, "also log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = flag("nvfp4-mae", "W&B project")


SECTIONS = {"data": DataConfig, "model": MAEConfig, "precision": PrecisionConfig, "optim": OptimConfig,
            "run": RunConfig}
SECTION_OF = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class Config:
    """Everything a run depends on, in five frozen sections. Field names are unique across
    sections (each is a flag's dest), so `get` and `replace` take them flat."""
    data: DataConfig
    model: MAEConfig
    precision: PrecisionConfig
    optim: OptimConfig
    run: RunConfig
    SECTIONS: ClassVar[dict] = SECTIONS  # what workbench.cli parses: a flag group per section
    PRESETS: ClassVar[dict] = MODEL_PRESETS

    def get(self, key: str):
        return getattr(getattr(self, SECTION_OF[key]), key)

    def replace(self, **changes) -> "Config":
        """A new Config with these fields changed, in whichever section each lives."""
        by_section = {}
        for key, value in changes.items():
            by_section.setdefault(SECTION_OF[key], {})[key] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **c) for s, c in by_section.items()})

    def flat(self) -> dict:
        return {key: self.get(key) for key in SECTION_OF}

    @classmethod
    def from_dict(cls, saved: dict) -> "Config":
        """The inverse of asdict (tuples may come back as lists, e.g. from JSON)."""
        tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**{section: SECTIONS[section](**tuples(saved[section])) for section in SECTIONS})


def parse_config(argv=None) -> tuple:
    """argv -> (Command, Config): parsed, resolved (per-device defaults) and validated once, by
    workbench.cli from the sections above; --compare's variants each build their model on the
    meta device first (check_model), --resume and --eval merge the flags given into the
    checkpoint's Config (cli.resume_config)."""
    return cli.parse_config(argv, Config, check_model, description=__doc__.split("\n\n")[0])


# ============================================================================= data
# workbench/data.py: load_images (CIFAR through torchvision, an image folder, fake noise) and
# make_loader (the tensor loader: augmentation on the training device; or torchvision's).


# ============================================================================= model

def require_contiguous(t: torch.Tensor, what: str) -> torch.Tensor:
    """Raise where a tensor is about to be viewed with a new shape but is not contiguous."""
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous before it is reshaped "
                         f"(shape {tuple(t.shape)}, stride {t.stride()})")
    return t


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches in row-major order, pixels (p, p, C) inside."""
    b, c, h, w = require_contiguous(imgs, "images").shape
    x = imgs.view(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    b, n, _ = require_contiguous(patches, "patches").shape
    h = w = int(round(math.sqrt(n)))
    x = patches.view(b, h, w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of MAE (half the channels per axis), a zero row for cls."""
    def axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([torch.sin(out), torch.cos(out)], 1)
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # MAE: np.meshgrid(grid_w, grid_h)
    emb = torch.cat([axis(dim // 2, grid_w), axis(dim // 2, grid_h)], 1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float().unsqueeze(0)


class Block(nn.Module):
    """Pre-norm ViT block: LayerNorm+QKV, SDPA, projection; LayerNorm+MLP (TE's fused shapes)."""

    def __init__(self, dim, heads, mlp_ratio, layers: nvfp4.LayerFactory, name: str):
        super().__init__()
        self.heads = heads
        self.attn_qkv = layers.norm_linear(f"{name}.attn_qkv", dim, 3 * dim)
        self.attn_proj = layers.linear(f"{name}.attn_proj", dim, dim)
        self.mlp = layers.norm_mlp(f"{name}.mlp", dim, int(dim * mlp_ratio))

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.attn_qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(*qkv.unbind(0))  # high precision, as in TE
        x = x + self.attn_proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


class MAE(nn.Module):
    """Masked Autoencoder with a ViT encoder on the visible patches and a light decoder.
    Every linear layer comes from `layers`, so quantized backends swap without model changes."""

    def __init__(self, cfg: MAEConfig, layers: nvfp4.LayerFactory = None):
        super().__init__()
        layers = layers or nvfp4.LayerFactory()
        self.cfg = cfg
        patch_dim = cfg.patch_size ** 2 * 3
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = layers.linear("patch_embed", patch_dim, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.embed_dim, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, layers, f"blocks.{i}")
                                    for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.decoder_embed = layers.linear("decoder_embed", cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(cfg.decoder_embed_dim, grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, layers, f"decoder_blocks.{i}")
            for i in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = layers.linear("decoder_pred", cfg.decoder_embed_dim, patch_dim)
        self.gemms = layers.gemms
        self.initialize_weights()

    def initialize_weights(self):
        """MAE's init: xavier-uniform matrices, zero biases, unit norms, N(0, 0.02) tokens."""
        for name, p in self.named_parameters():
            if name.endswith(("cls_token", "mask_token")):
                nn.init.normal_(p, std=0.02)
            elif p.dim() == 2:
                nn.init.xavier_uniform_(p)
            elif name.endswith(("layer_norm_weight", "norm.weight")):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def embed_visible(self, patches, ids_keep):
        """The kept patches, embedded with their positions, after the cls token."""
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        pos = self.pos_embed[:, 1:].expand(len(patches), -1, -1)
        x = self.patch_embed(visible) + torch.gather(pos, 1, ids_keep[..., None].expand(-1, -1, pos.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        return torch.cat([cls, x], 1)

    def forward_encoder(self, patches, ids_keep):
        x = self.embed_visible(patches, ids_keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def embed_decoder(self, latent, ids_restore):
        """Encoder output -> decoder tokens: mask tokens in the masked places, in patch order,
        with positions."""
        x = self.decoder_embed(latent)
        masked = ids_restore.shape[1] + 1 - x.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(len(x), masked, -1)], 1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # unshuffle
        return torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed

    def patchify(self, imgs):
        return patchify(imgs, self.cfg.patch_size)

    def unpatchify(self, patches):
        return unpatchify(patches, self.cfg.patch_size)

    def target(self, imgs):
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def predict_and_loss(self, x, imgs, ids_restore):
        """Decoder output -> per-patch predictions, the mask (1 = masked, in patch order) and
        the MSE on the masked patches only."""
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        mask = torch.ones(ids_restore.shape, device=x.device)
        mask[:, :self.cfg.num_visible] = 0
        mask = torch.gather(mask, 1, ids_restore)  # 1 = masked, in patch order
        per_patch = (pred.float() - self.target(imgs)).square().mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred, mask

    def forward(self, imgs, noise):
        """Per-sample random masking from `noise` [B, L] (keep the smallest): loss, pred, mask."""
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        latent = self.forward_encoder(self.patchify(imgs), ids_shuffle[:, :self.cfg.num_visible])
        x = self.embed_decoder(latent, ids_restore)
        for block in self.decoder_blocks:
            x = block(x)
        return self.predict_and_loss(x, imgs, ids_restore)

    def features(self, imgs):
        """Encoder cls-token features of whole (unmasked) images, for the linear probe and kNN."""
        ids = torch.arange(self.cfg.num_patches, device=imgs.device).expand(len(imgs), -1)
        return self.forward_encoder(self.patchify(imgs), ids)[:, 0]


# ============================================================================= precision

def precision_lines(config: Config, train_step) -> list:
    """The startup lines of the run's precision: backend, quantized layers, recipe, and the recipe
    switches taken from TE's environment variables."""
    lines = train_step.precision.describe(train_step.model.gemms)
    if config.precision.from_environment:
        lines.append(f"from the environment, as TE takes them (a flag wins): "
                     f"{', '.join(config.precision.from_environment)}")
    return lines


def resolve_precision(config: Config, device: torch.device) -> nvfp4.Precision:
    """The run's nvfp4.Precision: recipe, backend (and why), autocast dtype."""
    p = config.precision
    recipe = None
    if p.precision == "nvfp4":
        recipe = nvfp4.NVFP4Recipe(**{f.name: getattr(p, f.name) for f in fields(nvfp4.NVFP4Recipe)})
    elif p.precision == "fp8":
        recipe = nvfp4.FP8Recipe(backward_override=p.backward_override)
    try:
        return nvfp4.Precision.resolve(p.precision, device, p.backend, p.amp, recipe, p.keep_high_precision)
    except nvfp4.BackendError as error:
        hint = ("use --backend emulated (or auto) to run the same recipe in PyTorch" if error.te_imports
                else "install it on a Blackwell GPU machine (README: Transformer Engine)")
        raise UsageError(f"--backend te: {error}; {hint}") from None


def build_model(config: Config, device: torch.device, batch_per_rank: int) -> tuple:
    """(the MAE with its linear layers in the run's precision, that nvfp4.Precision)."""
    precision = resolve_precision(config, device)
    layers = precision.layers()
    with torch.device(device):
        model = MAE(config.model, layers)
    if precision.recipe is not None:
        unmatched = [p for p in precision.keep_high_precision if p not in layers.matched]
        if unmatched:
            raise UsageError(f"--keep-high-precision {unmatched[0]!r} matches no layer; the layers are "
                             f"{nvfp4.compact_names(layers.names)}")
        check_gemm_shapes(model, precision.recipe, batch_per_rank)
    return model, precision


def check_model(config: Config):
    """A --compare variant's model checks (layer patterns, GEMM shapes) before the first cell
    trains: built on the meta device, which allocates nothing, with the emulated layers (TE's
    have the same names)."""
    build_model(config.replace(backend="emulated"), torch.device("meta"), config.optim.batch_size)


def check_gemm_shapes(model: MAE, recipe, batch_per_rank: int):
    """Every quantized GEMM meets TE's multiples for this model and batch, else a message naming it."""
    cfg = model.cfg
    for name, k, n, quantized in model.gemms:
        if not quantized:
            continue
        tokens = cfg.num_visible if name == "patch_embed" else (
            cfg.num_visible + 1 if name.startswith(("blocks.", "decoder_embed")) else cfg.num_patches + 1)
        error = nvfp4.gemm_shape_error(recipe, batch_per_rank * tokens, k, n)
        if error:
            raise UsageError(f"layer {name}: {error}; change --batch-size, the model, or keep the layer in high precision "
                             f"with --keep-high-precision")


# ============================================================================= train step

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_optimizer(model, optim: OptimConfig, capturable: bool = False):
    """AdamW (0.9, 0.95), fused (its found_inf lets the loss guard skip a step on the device);
    no weight decay on biases and norms (1-D parameters). capturable: can run in a CUDA graph."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.peak_lr, betas=(0.9, 0.95), fused=True, capturable=capturable)


def lr_at(step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """The lr of optimizer step `step` (from 0): MAE's schedule, warm-up then cosine, per step."""
    return optim.peak_lr * warmup_cosine(step / steps_per_epoch, optim.warmup_epochs, optim.epochs)


def compile_model(model: MAE, model_graphs: bool):
    """Regional compilation, in place (PyTorch's recipe for models of repeated blocks): the blocks
    of one shape share one compiled graph, and the three pieces of glue around them compile once
    each, so a cold compile traces each block shape once instead of the whole unrolled model
    (docs/RESULTS.md: Speed history, "Compile"), for the same step time.
    model_graphs: CUDA graphs per region (mode="reduce-overhead") for single-GPU runs whose step
    TrainStep cannot capture whole (TE, fp16's GradScaler). Evaluation, reconstructions and
    --fp4-stats passes see other shapes, so they run the same modules eagerly
    (set_stance("force_eager")) rather than compile again."""
    options = dict(mode="reduce-overhead" if model_graphs else None, dynamic=False)
    for block in (*model.blocks, *model.decoder_blocks):
        block.compile(**options)
    for name in ("embed_visible", "embed_decoder", "predict_and_loss"):
        setattr(model, name, torch.compile(getattr(model, name), **options))


COMPILE_STEPS = 3  # a compiled step's steps until it runs at speed: two warm-up calls, then the capture


class TrainStep:
    """One optimizer step of the MAE, called with a batch: model, optimizer, scaler, loss guard.

    On one GPU with compile on (emulated layers, no GradScaler), the whole step (forward,
    backward, gradient norm, loss guard, fused AdamW) is captured in one CUDA graph after two
    warm-up steps and replayed: the host then launches one graph per step. With per-region
    graphs instead, the host still launches every region's graph and the optimizer's kernels,
    and at small batches that takes as long as the GPU's step, which then waits on the host."""

    def __init__(self, config: Config, device, world=1):
        self.device = device
        self.model, self.precision = build_model(config, device, config.optim.batch_size // world)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision.needs_grad_scaler else None
        single_gpu = device.type == "cuda" and world == 1
        # TE has its own graph API (te.make_graphed_callables)
        self.graphed = config.run.compile and single_gpu and self.scaler is None and self.precision.backend != "te"
        self.optimizer = make_optimizer(self.model, config.optim, capturable=self.graphed)
        self.guard = LossGuard(config.run.max_bad_steps, device)
        if config.run.compile:
            compile_model(self.model, single_gpu and not self.graphed)
        self.net = self.model if world == 1 else nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)
        self.graph = CUDAGraphed(self._step, device) if self.graphed else None

    def __call__(self, imgs, noise, lr: float, step: int):
        """Optimizer step number `step` (from 1); returns loss, grad norm, skipped (0/1) (with CUDA
        graphs: the graph's output tensors, overwritten by the next step)."""
        self._set_lr(lr)
        self.step_number.fill_(step)
        return self.graph(imgs, noise) if self.graphed else self._step(imgs, noise)

    @property
    def unquantized(self) -> bool:
        """Whether a precision schedule switched this step's quantized layers to high precision."""
        return self.precision.recipe is None and self.precision.name in ("fp8", "nvfp4")

    def to_high_precision(self):
        """The precision schedule's switch (--high-precision-from): the linear layers run unquantized
        (in the AMP dtype) from the next step on; parameters, optimizer state and data order stay.
        A compiled model recompiles once (the layers' recipe is an attribute its guards read), and
        a captured step is captured again."""
        self.precision = self.precision.unquantize(self.model)
        self.graph = CUDAGraphed(self._step, self.device) if self.graphed else None

    def _set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            if not self.graphed:
                group["lr"] = lr
            elif isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda:
                group["lr"].fill_(lr)  # the graph reads it from the device
            else:  # before the capture (a checkpoint may have brought a float)
                group["lr"] = torch.tensor(lr, dtype=torch.float32, device=self.device)

    def _step(self, imgs, noise):
        with self.precision.autocast():
            loss, _, _ = self.net(imgs, noise)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        found_inf = self.guard.update(loss.detach(), grad_norm, self.step_number)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = found_inf  # the fused step is a no-op where found_inf is 1
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm, found_inf


# ============================================================================= training loop

class Progress:
    """Where a run is (epoch, batch within it, optimizer steps) and its running loss sums (on the
    device): what a resumed run needs to continue the same schedule and the same metrics lines."""
    SUMS = ("interval_loss", "interval_count", "epoch_loss", "epoch_count")

    def __init__(self, device, state=None):
        state = state or {}
        self.epoch, self.batch, self.step = state.get("epoch", 0), state.get("batch", 0), state.get("step", 0)
        self.sums = {k: torch.tensor(state.get("sums", {}).get(k, 0.0), device=device) for k in self.SUMS}

    def add(self, loss, bad):
        """Count a step's loss unless the guard skipped it."""
        good = 1 - bad
        for span in ("interval", "epoch"):
            self.sums[f"{span}_loss"] += torch.nan_to_num(loss) * good
            self.sums[f"{span}_count"] += good

    def take_mean(self, span: str, world: int) -> Optional[float]:
        """The mean loss since the last take (over all ranks), None if the guard skipped every
        step; the sums start again from zero."""
        total = torch.stack([self.sums[f"{span}_loss"], self.sums[f"{span}_count"]])
        if world > 1:
            dist.all_reduce(total)
        self.sums[f"{span}_loss"].zero_()
        self.sums[f"{span}_count"].zero_()
        count = total[1].item()
        return total[0].item() / count if count else None  # None: every step was skipped

    def state_dict(self, epoch: int, batch: int) -> dict:
        return {"epoch": epoch, "batch": batch, "step": self.step,
                "sums": {k: v.item() for k, v in self.sums.items()}}


class TrainingLoop:
    """One training run: data, train step, run folder, log and progress; `train` runs the epochs.
    run_dir and ckpt: the folder and checkpoint of a resumed run."""

    def __init__(self, config: Config, rank=0, world=1, run_dir=None, ckpt=None, resume_changes=()):
        self.rank, self.world, self.device = rank, world, torch.device(config.run.device)
        self.config, self.run_dir = self._claim_folder(config, run_dir, resumed=ckpt is not None)
        self._load_data()
        self._build_step()
        self.progress = Progress(self.device, ckpt["progress"] if ckpt else None)
        if ckpt is not None:
            self._restore(ckpt)
        self.complete = self.progress.epoch >= config.optim.epochs  # a finished run, resumed
        self._open_run_folder(resumed=ckpt is not None)
        self._announce(resume_changes, ckpt is not None)
        self._plan_precision_schedule()

    def _claim_folder(self, config, run_dir, resumed) -> tuple:
        """(config, run folder), the folder claimed by rank 0 before the data loads: a resumed
        run's own, or a new one whose name goes into the config."""
        if self.rank == 0 and resumed:
            claim_folder(run_dir)  # one process at a time goes on with a run
        elif self.rank == 0:
            run_dir = plan_run_dir(config)
            config = config.replace(run_name=str(run_dir.relative_to(config.run.out_dir)))  # the name used
        return config, run_dir

    def _load_data(self):
        c = self.config
        seed_everything(seed_for(c.run.seed, self.rank))
        self.train_split, self.heldout_split = load_images(c, train=True), load_images(c, train=False)
        if len(self.train_split.images) < c.optim.batch_size:
            raise UsageError(f"--batch-size {c.optim.batch_size} is larger than the "
                             f"{len(self.train_split.images)} training images")
        self.loader = make_loader(c, self.train_split, self.rank, self.world)

    def _build_step(self):
        torch.manual_seed(self.config.run.seed)  # the same initial weights on every rank and backend
        self.train_step = TrainStep(self.config, self.device, self.world)
        seed_everything(seed_for(self.config.run.seed, self.rank))  # per-rank streams again (stochastic rounding)

    def _open_run_folder(self, resumed):
        """Rank 0: a new run's folder emptied (--overwrite) and its config.json written, now that
        the run can start; a resumed run's metrics.jsonl cut back to its checkpoint's step. Then the
        log opens (every rank: the others write nothing)."""
        if self.rank == 0 and not resumed:
            make_run_dir(self.run_dir, self.config.run.overwrite)
            (self.run_dir / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        elif self.rank == 0 and not self.complete:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.progress.step)
        self.log = RunLog(self.run_dir, self.config, self.rank == 0)
        self.fp4_rows, self.saved, self.warmup_s, self.peak_mem_gib = {}, None, None, None

    def _plan_precision_schedule(self):
        """--high-precision-from: the last step in the run's precision; a run resumed after it
        switches now."""
        f, o = self.config.precision.high_precision_from, self.config.optim
        self.high_precision_step = None if f is None else math.floor(f * o.epochs * len(self.loader))
        if self.high_precision_step is not None and self.progress.step > self.high_precision_step:
            self._switch_precision(resumed=True)

    def _restore(self, ckpt):
        t = self.train_step
        load_model_state(t.model, ckpt["model"], "the checkpoint")
        t.optimizer.load_state_dict(ckpt["optimizer"])
        if t.scaler and ckpt["scaler"]:
            t.scaler.load_state_dict(ckpt["scaler"])
        t.guard.load_state_dict(ckpt["guard"])
        if self.world == 1:
            set_rng_state(ckpt["rng"], self.device)
        else:  # DDP ranks re-derive their RNG (used by stochastic rounding only) from seed, rank, step
            torch.manual_seed(seed_for(self.config.run.seed, self.rank, self.progress.step))

    def _announce(self, resume_changes, resumed):
        c, m, log = self.config, self.config.model, self.log
        noise = " (random noise: smoke runs and benchmarks only)" if c.data.dataset == "fake" else ""
        log.print(f"[run] {self.run_dir}  |  {c.data.dataset}: {len(self.train_split.images)} train images{noise}, "
                  f"{c.data.loader} loader on {self.device}")
        log.print(f"[model] {m.preset}: encoder {m.embed_dim}x{m.depth}, decoder {m.decoder_embed_dim}x"
                  f"{m.decoder_depth}, {m.img_size}px / patch {m.patch_size} = {m.num_patches} patches, "
                  f"{m.num_visible} visible | {sum(p.numel() for p in self.train_step.model.parameters()) / 1e6:.2f}M params")
        for line in precision_lines(c, self.train_step):
            log.print(f"[precision] {line}")
        o = c.optim
        log.print(f"[optim] batch {o.batch_size} ({self.world} process{'es' if self.world > 1 else ''}), "
                  f"lr {o.peak_lr:.3g}, warmup {o.warmup_epochs:g} of {o.epochs} epoch{'s' * (o.epochs != 1)}, AMP "
                  f"{'on' if c.precision.amp else 'off'}, compile {'on' if c.run.compile else 'off'}"
                  f"{' (whole step in one CUDA graph)' if self.train_step.graphed else ''}, seed {c.run.seed}")
        if o.warmup_epochs >= o.epochs:
            log.print(f"[optim] warning: --warmup-epochs {o.warmup_epochs:g} >= --epochs {o.epochs}: the lr rises "
                      f"for the whole run and never reaches its peak {o.peak_lr:.3g}")
        for change in resume_changes:
            log.print(f"[resume] {change}")
        p = self.progress
        if self.complete:
            log.print(f"[resume] {self.run_dir} is complete ({p.epoch} of {o.epochs} epoch{'s' * (o.epochs != 1)}); pass --epochs N to "
                      f"train it on")
        elif resumed:
            log.print(f"[resume] from step {p.step} (epoch {p.epoch + 1}, batch {p.batch})")

    def train(self) -> dict:
        """All epochs; a checkpoint every --save-every epochs and at the end; reconstructions."""
        if self.complete:
            if self.rank == 0 and not self._final_grid_path().exists():  # stopped between checkpoint and grid
                self._final_grid()
            self.log.close()
            return self.summary()
        stop = StopRequest()
        stop.install()
        self.start_time, self.compiles_end = time.perf_counter(), {self.progress.step + COMPILE_STEPS}
        if self.device.type == "cuda":  # the peak is this run's (a sweep trains many in one process)
            torch.cuda.reset_peak_memory_stats(self.device)
        epochs, save_every = self.config.optim.epochs, self.config.run.save_every
        try:
            for epoch in range(self.progress.epoch, epochs):
                self._epoch(epoch, stop)
                if self.rank == 0 and ((epoch + 1) % save_every == 0 or epoch + 1 == epochs):
                    self.saved = self._checkpoint(epoch + 1, 0)
            self._finish()
        except NonFiniteLossError as error:
            self.log.print(f"[stop] {error}. Last good checkpoint: {latest_checkpoint(self.run_dir) or 'none yet'}")
            self.log.close()
            raise
        finally:
            stop.restore()
        if stop.signal is not None:  # it came while the final checkpoint or grid was written: both were
            raise Interrupted(stop.signal, self.saved)
        return self.summary()

    def summary(self) -> dict:
        """What the run reports (main's return; a --compare cell's record): its metrics.jsonl read
        back (read_summary), the final grid, and what this process measured: the checkpoint it
        saved last, its compile warm-up and peak memory."""
        summary = read_summary(self.run_dir / "metrics.jsonl") if self.rank == 0 else {}
        grid = self._final_grid_path() if self.rank == 0 else None
        extra = {"checkpoint": self.saved and str(self.saved), "warmup_s": self.warmup_s,
                 "peak_mem_gib": self.peak_mem_gib, "recon": str(grid) if grid and grid.exists() else None}
        return {**summary, "run_dir": str(self.run_dir), "backend": self.train_step.precision.backend_name,
                **{key: value for key, value in extra.items() if value is not None}}

    def _epoch(self, epoch, stop):
        o, p, steps = self.config.optim, self.progress, len(self.loader)
        first = p.batch if epoch == p.epoch else 0
        skipped_before = self.train_step.guard.skipped_steps()
        t0 = interval_t0 = time.perf_counter()
        seen = interval_seen = 0
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{o.epochs}", disable=self.rank != 0,
                   dynamic_ncols=True, leave=False)
        for b, (imgs, noise) in enumerate(self.loader.epoch(epoch, first), start=first):
            if p.step == self.high_precision_step and not self.train_step.unquantized:
                self._switch_precision()
            loss, grad_norm, bad = self.train_step(imgs, noise, lr_at(p.step, steps, o), p.step + 1)
            p.step += 1
            p.add(loss, bad)
            seen, interval_seen = seen + o.batch_size, interval_seen + o.batch_size
            bar.update(1)
            if p.step in self.compiles_end:
                self._compiled()
            if b == first:  # the bar shows loss from its first step on (one sync an epoch)
                shown = dict(loss=f"{loss.item():.4f}")
            shown["lr"] = f"{lr_at(p.step - 1, steps, o):.2e}"  # every step's (host arithmetic, no sync)
            bar.set_postfix(shown, refresh=False)
            if p.step % self.config.run.log_every == 0:
                record = self._log_step(epoch, lr_at(p.step - 1, steps, o), grad_norm,
                                        interval_seen / (time.perf_counter() - interval_t0), imgs, noise)
                shown = dict(loss="n/a" if record["loss"] is None else f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             img_s=f"{record['img_per_s']:.0f}")
                bar.set_postfix(shown)
                interval_t0, interval_seen = time.perf_counter(), 0
            if stop.signal is not None:
                bar.close()
                self._interrupt(stop.signal, epoch, b + 1)
        bar.close()
        self._log_epoch(epoch, seen, time.perf_counter() - t0, skipped_before)

    def _switch_precision(self, resumed=False):
        """--high-precision-from: the steps after high_precision_step run unquantized; logged, and
        in metrics.jsonl as a record of the first such step (written once: a resumed run past it
        finds it there)."""
        self.train_step.to_high_precision()
        if not resumed:  # it compiles (and captures) again
            self.compiles_end.add(self.progress.step + COMPILE_STEPS)
        amp = self.train_step.precision.amp_dtype
        dtype = str(amp).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16") if amp else "fp32"
        first, total = self.high_precision_step + 1, self.config.optim.epochs * len(self.loader)
        self.log.print(f"[precision] steps {first}-{total}: linear layers unquantized in {dtype} "
                       f"(--high-precision-from {self.config.precision.high_precision_from:g})")
        if not resumed:
            self.log.metrics({"type": "precision", "step": first, "gemm": dtype})

    def _compiled(self):
        """The steps after a (re)compile have run: the compile workers stop (a recompile started
        them again; see stop_compile_workers), and the run's first such steps are its warm-up."""
        if self.config.run.compile:
            stop_compile_workers()
        if self.warmup_s is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - self.start_time
        what = "compile warm-up" if self.config.run.compile else "no compile"
        self.log.print(f"[speed] first {COMPILE_STEPS} steps ({what}) took {self.warmup_s:.1f} s")

    def _log_step(self, epoch, lr, grad_norm, img_per_s, imgs, noise) -> dict:
        self.train_step.guard.check()
        record = {"type": "step", "step": self.progress.step, "epoch": epoch + 1,
                  "loss": self.progress.take_mean("interval", self.world), "lr": lr, "grad_norm": grad_norm.item(),
                  "skipped_steps": self.train_step.guard.skipped_steps(), "img_per_s": img_per_s}
        self.log.metrics(record)
        if self.config.precision.fp4_stats and self.rank == 0:
            rows = fp4_diagnostics(self.train_step, imgs, noise)
            self.log.metrics({"type": "fp4_stats", "step": self.progress.step, "layers": rows})
            for key, row in rows.items():
                self.fp4_rows.setdefault(key, []).append(row)
        return record

    def _log_epoch(self, epoch, seen, seconds, skipped_before):
        """The epoch's record (skipped_steps: the run's so far) and line (the steps skipped in the
        part of the epoch this process ran); img/s is None for an epoch resumed at its end."""
        self.train_step.guard.check()
        record = {"type": "epoch", "epoch": epoch + 1, "step": self.progress.step,
                  "loss": self.progress.take_mean("epoch", self.world), "skipped_steps": self.train_step.guard.skipped_steps(),
                  "time_s": seconds, "img_per_s": seen / seconds if seen else None}
        self.log.metrics(record)
        skipped = record["skipped_steps"] - skipped_before
        loss = f"loss {record['loss']:.4f}" if record["loss"] is not None else "loss n/a (every step skipped)"
        speed = f"{record['img_per_s']:.0f} img/s" if seen else "no steps left to time"
        self.log.print(f"epoch {epoch + 1}/{self.config.optim.epochs}  {loss}  {speed}  {seconds:.1f} s"
                       f"{f'  skipped {skipped} step' + 's' * (skipped != 1) if skipped else ''}")

    def _checkpoint(self, epoch, batch) -> Path:
        return save_checkpoint(self.train_step, self.config, self.run_dir, self.progress.state_dict(epoch, batch))

    def _interrupt(self, sig, epoch, batch):
        checkpoint = None
        if self.rank == 0:
            checkpoint = self._checkpoint(epoch, batch)
            save_reconstructions(self.train_step, self.config, self.heldout_split.images, self.run_dir,
                                 f"recon_step{self.progress.step:08d}")
            self.log.print(f"[stop] checkpoint {checkpoint}; continue with --resume {self.run_dir}")
        self.log.close()
        raise Interrupted(sig, checkpoint)

    def _final_grid_path(self) -> Path:
        return self.run_dir / "recons" / f"final_recon_ep{self.config.optim.epochs:04d}.png"

    def _final_grid(self):
        png = save_reconstructions(self.train_step, self.config, self.heldout_split.images, self.run_dir,
                                   self._final_grid_path().stem)
        self.log.print(f"[final] reconstructions: {png} (rows: original | visible | reconstruction)")

    def _finish(self):
        if self.rank == 0:
            self._final_grid()
            if self.fp4_rows:
                summarize_fp4(self.fp4_rows, self.log)
        if self.device.type == "cuda":
            self.peak_mem_gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.log.close()


@torch.compiler.set_stance("force_eager")
def fp4_diagnostics(train_step: TrainStep, imgs, noise):
    """One eager forward/backward with NVFP4 statistics on (no optimizer step, training RNG untouched)."""
    devices = [train_step.device] if train_step.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), nvfp4.collect_fp4_stats() as stats:
        with train_step.precision.autocast():
            loss, _, _ = train_step.model(imgs, noise)
        loss.backward()
    train_step.optimizer.zero_grad(set_to_none=True)
    return stats.rows


def summarize_fp4(rows_by_key, log):
    summary = {key: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for key, rows in rows_by_key.items()}
    log.print("[fp4-stats] mean over logged steps:  layer.operand  flushed-to-zero  at-block-max  "
              "scale range  rel. error")
    for key, s in summary.items():
        log.print(f"  {key:32s} {s['flushed_to_zero']:8.2%} {s['at_block_max']:8.2%}  "
                  f"[{s['scale_min']:.3g}, {s['scale_max']:.3g}]  {s['rel_error']:.3f}")
    log.metrics({"type": "fp4_summary", "layers": summary})


# ============================================================================= outputs

def load_checkpoint(path: Path) -> tuple:
    """(checkpoint, its Config), read as untrusted input with every field checked (workbench.files)."""
    return files.load_checkpoint(path, Config, Progress.SUMS)


def save_reconstructions(train_step: TrainStep, config: Config, heldout_images, run_dir: Path, name: str) -> Path:
    """run_dir/recons/NAME.{png,pt} for 8 held-out images: rows original | visible-only |
    reconstruction; copied to <out-dir>/recons/<run folder>_NAME.* as the latest view."""
    model, device = train_step.model, train_step.device
    imgs = plain_images(heldout_images[:8], config.data.dataset, config.model.img_size).to(device)
    noise = torch.rand(len(imgs), config.model.num_patches,
                       generator=torch.Generator().manual_seed(config.run.seed)).to(device)
    was_training = model.training
    model.eval()
    loss, originals, visible, recon, mask = reconstruct(model, imgs, noise, train_step.precision, config.data.dataset)
    model.train(was_training)
    folder = run_dir / "recons"
    folder.mkdir(exist_ok=True)
    png = folder / f"{name}.png"
    save_image(make_grid(torch.cat([originals, visible, recon]).cpu(), nrow=len(imgs)), png)
    torch.save({"imgs": originals.cpu(), "visible": visible.cpu(), "recon": recon.cpu(),
                "mask": mask.cpu(), "loss": loss}, png.with_suffix(".pt"))
    latest = Path(config.run.out_dir) / "recons"
    latest.mkdir(parents=True, exist_ok=True)
    for f in (png, png.with_suffix(".pt")):
        shutil.copyfile(f, latest / f"{run_dir.name}_{f.name}")
    return png


# ============================================================================= workbench

def benchmark_step(config: Config) -> TrainStep:
    """--benchmark's train step (workbench.benchmark times it), seeded as a run's."""
    seed_everything(config.run.seed)
    train_step = TrainStep(config, torch.device(config.run.device))
    for line in precision_lines(config, train_step):
        print(f"[precision] {line}")
    return train_step


def train_cell(config: Config, run_dir: Path) -> TrainingLoop:
    """--compare's training run of a cell (workbench.compare trains and evaluates it): a new one,
    or on from the last checkpoint a stopped sweep left in run_dir."""
    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if last is None:
        return TrainingLoop(config)
    print(f"[compare] going on from {last}")
    return TrainingLoop(config, run_dir=run_dir, ckpt=load_checkpoint(last)[0])


# ============================================================================= main

def init_distributed(mode: str) -> tuple:
    """(rank, world) from torchrun's environment, the process group set up (gloo on CPU, nccl on
    GPU). Only training runs distributed: the other modes refuse to run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and mode not in ("train", "resume"):
        raise UsageError(f"--{mode} runs in one process; start it with python, not torchrun")
    if world == 1:
        return 0, 1
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (README: multi-GPU)
    use_gpu = torch.cuda.is_available() and os.environ.get("ASMAE_FORCE_GLOO") != "1"
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv=None):
    try:
        command, config = parse_config(argv)
        rank, world = init_distributed(command.mode)
        if command.mode == "eval":
            return evaluate_checkpoint(command.eval, config, command.explicit, Finetune.of(command), build_model,
                                       load_checkpoint)
        if config.run.compile:
            start_compile_workers()
        if command.mode == "benchmark":
            return benchmark.run_benchmark(config, lambda: benchmark_step(config), command.benchmark,
                                           command.benchmark_synthetic, command.profile,
                                           stop_compile_workers if config.run.compile else None)
        if command.mode == "compare":
            return compare.run_compare(command.variants, command.sweep_seeds, Finetune.of(command), train_cell)
        run_dir, ckpt, changes = None, None, []
        if command.mode == "resume":
            path = find_checkpoint(command.resume, "--resume")
            ckpt, saved = load_checkpoint(path)
            config, changes = cli.resume_config(saved, config, command.explicit)
            run_dir = path.parent
        return TrainingLoop(config, rank, world, run_dir, ckpt, changes).train()
    except UsageError as error:
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one line, not one per rank
            print(f"asmae_minimal.py: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as error:  # the machine refused a write (disk full, read-only): one line too
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f": {error.filename}" if error.filename else " (writing the run's outputs)"
        print(f"asmae_minimal.py: error: {error.strerror}{where}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLossError as error:
        print(f"asmae_minimal.py: stopped: {error}", file=sys.stderr)
        raise SystemExit(3)
    except Interrupted as stopped:
        print(f"asmae_minimal.py: {stopped}", file=sys.stderr)
        raise SystemExit(128 + stopped.sig)
    finally:
        release_folders()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
