#!/usr/bin/env python
"""Pretrain a ViT Masked Autoencoder (He et al. 2021) on CIFAR with its linear layers in
NVFP4, FP8 or BF16, and see what 4-bit training costs: losses, pictures, speed, memory.

    python asmae_minimal.py --dataset cifar100 --epochs 150 --batch-size 128 --mask-ratio 0.6 --randaugment
    python asmae_minimal.py --precision nvfp4 --epochs 50
    python asmae_minimal.py --compare bf16,fp8,nvfp4,nvfp4:high-precision-from=0.9 --seeds 0,1,2 --epochs 20

The sections follow the data:
    config         flags -> one frozen Config (data, model, precision, optim, run), validated once
    data           CIFAR / folder / fake images as uint8 tensors; the loaders (augmentation, masks)
    model          patchify, the ViT blocks, the MAE and its mask check
    precision      the linear layers in the run's precision (nvfp4.Precision), GEMM shape check
    train step     optimizer, schedule, compile, the loss guard; one optimizer step (CUDA graph)
    training loop  epochs, progress, logging, signals, the precision schedule, FP4 statistics
    outputs        checkpoints, run folders, metrics.jsonl / W&B, reconstruction grids
    evaluation     held-out loss and PSNR, linear probe, kNN, fine-tuning
    comparison     --compare: a run per (variant, seed), resumable; means, paired CIs, figures
    benchmark      --benchmark: img/s, step time, memory, data share, MFU
    main           distributed setup, dispatch, exit codes
"""
import argparse
import copy
import dataclasses
import errno
import fcntl
import fnmatch
import gc
import importlib.util
import itertools
import json
import math
import netrc
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import typing
import warnings
import urllib.parse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import augment
import nvfp4

try:
    import augment_kernel  # Triton: the GPU loader's augmentation in one kernel
except ImportError:
    augment_kernel = None

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


def flag(default, help: str, **argparse_kwargs):
    """A config field that is a command-line flag: --field-name (or argparse_kwargs' `flag`), its
    type from the annotation, `help` for --help. An Optional[bool] field is the pair --x / --no-x
    (`off`: the help of --no-x), None until the CLI fills its per-device default."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


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
    name: Optional[str] = flag(None, "GEMM precision of the linear layers (default: bf16 with AMP, else fp32)",
                               flag="--precision", choices=nvfp4.PRECISIONS)
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
                                     "(TE nvfp4_4over6)", choices=nvfp4.formats.SCOPES)
    nvfp4_4over6_e4m3_use_256: str = flag("all", "NVFP4: which 4over6 operands bound the global scale's E4M3 by 256, "
                                                 "not 448 (TE nvfp4_4over6_e4m3_use_256)", choices=nvfp4.formats.SCOPES)
    nvfp4_4over6_err_mode: str = flag("MAE", "NVFP4: the error 4over6 compares (TE nvfp4_4over6_err_mode)",
                                      choices=nvfp4.formats.FOUR_OVER_SIX_ERR_MODES)
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


@dataclass(frozen=True)
class Command:
    """What to do with the Config: train (the default), resume, evaluate, compare or benchmark."""
    resume: Optional[str] = flag(None, "continue from a checkpoint file or a run folder", metavar="PATH")
    eval: Optional[str] = flag(None, "evaluate a checkpoint (held-out loss, PSNR, linear probe, kNN) and exit",
                               metavar="CKPT")
    compare: Optional[str] = flag(None, "train the same config in each variant: a precision, then :switch or "
                                        ":switch=value of the precision flags without -- (e.g. "
                                        "bf16,nvfp4,nvfp4:no-rht,nvfp4:high-precision-from=0.9), and write a "
                                        "report", metavar="VARIANTS")
    seeds: Optional[str] = flag(None, "with --compare: train every variant with each of these seeds (e.g. 0,1,2; "
                                      "default: --seed) and report mean, std and paired 95%% CIs", metavar="SEEDS")
    finetune_epochs: Optional[int] = flag(None, "with --eval or --compare: fine-tune the encoder and a linear head on "
                                                "the labelled training split for N epochs and report held-out top-1 "
                                                "(default: 0 with --eval, 5 with --compare)", metavar="N")
    finetune_precision: str = flag("bf16", "bf16: fine-tune with the linear layers unquantized (in the AMP dtype); "
                                           "pretrain: in the pretraining precision", choices=["bf16", "pretrain"])
    benchmark: Optional[int] = flag(None, "time N steps after warm-up and exit", metavar="N")
    benchmark_synthetic: bool = flag(False, "with --benchmark: a fixed batch on the device, model and optimizer only")
    profile: bool = flag(False, "with --benchmark: profile 20 more steps (torch.profiler), print CUDA time per step "
                                "by kernel group (GEMM, quantize, attention, ...) and the top kernels, and write a "
                                "Chrome trace to the out dir")
    variants: tuple = ()  # --compare: one Variant (label, validated Config) each
    sweep_seeds: tuple = ()  # --compare: the seeds of --seeds (or --seed)
    explicit: frozenset = frozenset()  # the dests given on the command line (a resumed run applies these)

    @property
    def mode(self) -> str:
        return next(iter(self.modes()), "train")

    def modes(self) -> list:
        """The modes given (they exclude each other), in the order `mode` takes them."""
        return [m for m in ("eval", "benchmark", "compare", "resume") if getattr(self, m) is not None]


COMPARE_FINETUNE_EPOCHS = 5  # --compare's default fine-tuning evaluation (where the data has labels)
# A resumed run must rebuild the same model on the same data.
RESUME_CONFLICTS = ("preset", "img_size", "patch_size", "name", "dataset", "norm_pix_loss")
# PrecisionConfig's switches of one format: of NVFP4's recipe, of any quantized precision.
NVFP4_ONLY = ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization", "row_scaled_activation",
              "nvfp4_4over6", "nvfp4_4over6_e4m3_use_256", "nvfp4_4over6_err_mode", "fp4_stats")
QUANTIZED_ONLY = ("backward_override", "high_precision_from")
PRECISION_DEFAULTS = {f.name: f.default for f in fields(PrecisionConfig)}


def flag_of(name: str) -> str:
    """The command-line flag of a config field."""
    f = next(f for cls in SECTIONS.values() for f in fields(cls) if f.name == name)
    return f.metadata.get("flag", "--" + name.replace("_", "-"))


def listed(flags: list) -> str:
    """'--a applies' or '--a, --b apply'."""
    return f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def switches_set(values, names) -> list:
    """The flags among `names` whose PrecisionConfig value (values: a dict or the config) is not
    the default."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    return [flag_of(name) for name in names if get(name) != PRECISION_DEFAULTS[name]]


class UsageError(Exception):
    """A bad input: main() prints it on one line and exits with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, but not None/False ones (0 is shown)
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def name_patterns(text: str) -> tuple:
    """'a, b.*' -> ('a', 'b.*'); '' -> ()."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The CLI: one group per Config section (and the Command), one flag per field with a help.
    with_defaults=False leaves the flags not given out of the namespace (to see what was)."""
    p = ArgumentParser(prog="asmae_minimal.py", description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter,
                       argument_default=None if with_defaults else argparse.SUPPRESS)
    for title, cls in (*SECTIONS.items(), ("what to run", Command)):
        group = p.add_argument_group(title)
        for f in fields(cls):
            if "help" in f.metadata:
                add_flag(group, f, with_defaults)
    return p


def number(text: str) -> float:
    """argparse type of the float flags: a finite number in ASCII digits (inf, nan and, say,
    full-width digits, which float() would take, are refused)."""
    value = float(text) if text.isascii() else math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"takes a finite number, got {text!r}")
    return value


def whole_number(text: str) -> int:
    """argparse type of the integer flags: ASCII digits (int() would read '１' as 1)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}")
    return int(text)


def add_flag(group, f: dataclasses.Field, with_defaults: bool):
    kwargs = dict(f.metadata)
    name, off = kwargs.pop("flag", "--" + f.name.replace("_", "-")), kwargs.pop("off", None)
    kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
    if with_defaults:
        kwargs["default"] = ",".join(f.default) if kind is tuple else f.default  # a string default is parsed
    if off is not None:  # --x / --no-x, either or neither
        pair = group.add_mutually_exclusive_group()
        pair.add_argument(name, dest=f.name, action="store_const", const=True, **kwargs)
        pair.add_argument("--no-" + name[2:], dest=f.name, action="store_const", const=False, help=off)
    elif kind is bool:
        group.add_argument(name, dest=f.name, action="store_true", **kwargs)
    else:
        types = {tuple: name_patterns, float: number, int: whole_number}
        group.add_argument(name, dest=f.name, type=types.get(kind, kind), **kwargs)


def parse_config(argv=None) -> tuple:
    """argv -> (Command, Config), parsed and resolved once. The Config is validated, and for
    --compare Command.variants holds one validated Config per precision (the first is returned
    too); for --resume and --eval, resume_config merges the flags given into the checkpoint's
    Config and validates that."""
    ns = vars(build_parser().parse_args(argv))
    explicit = frozenset(vars(build_parser(with_defaults=False).parse_args(argv)))
    command = Command(**{f.name: ns[f.name] for f in fields(Command) if f.name in ns}, explicit=explicit)
    modes = command.modes()
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1]} do not go together")
    if command.benchmark is not None and command.benchmark <= 0:
        raise UsageError(f"--benchmark must be positive, got {command.benchmark}")
    if command.benchmark_synthetic and command.benchmark is None:
        raise UsageError("--benchmark-synthetic needs --benchmark N")
    if command.profile and command.benchmark is None:
        raise UsageError("--profile needs --benchmark N")
    if command.seeds is not None and command.compare is None:
        raise UsageError("--seeds needs --compare (a single run takes --seed)")
    finetune_given = {"finetune_epochs", "finetune_precision"} & explicit
    if finetune_given and command.mode not in ("eval", "compare"):
        raise UsageError(f"--{sorted(finetune_given)[0].replace('_', '-')} goes with --eval or --compare")
    if command.finetune_epochs is not None and command.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs must be >= 0, got {command.finetune_epochs}")
    if command.finetune_epochs is None:
        command = dataclasses.replace(command, finetune_epochs=COMPARE_FINETUNE_EPOCHS if command.mode == "compare" else 0)
    device = resolve_device(ns["device"])
    if command.mode in ("resume", "eval"):
        return command, resolve_config(ns, ns["name"], device, explicit)
    if command.mode != "compare":
        return command, validate(resolve_config(ns, ns["name"], device, explicit))
    labels = split_variants(command.compare)
    if not labels or len(set(labels)) < len(labels):
        raise UsageError(f"--compare takes a comma-separated list of distinct variants (a precision from "
                         f"{', '.join(nvfp4.PRECISIONS)}, then :switch or :switch=value, e.g. nvfp4:no-rht), "
                         f"got {command.compare!r}")
    precisions = [label.split(":")[0] for label in labels]
    if "nvfp4" not in precisions and switches_set(ns, NVFP4_ONLY):
        raise UsageError(f"{listed(switches_set(ns, NVFP4_ONLY))} to nvfp4, which --compare does not list")
    seeds = parse_seeds(command.seeds, ns["seed"])
    variants = tuple(Variant(label, parse_variant(label, ns, device, explicit)) for label in labels)
    for i, (label, config) in enumerate(variants):
        same = next((other for other, c in variants[:i] if c == config), None)
        if same is not None:
            raise UsageError(f"--compare variants {same!r} and {label!r} are the same configuration; drop one")
    return dataclasses.replace(command, variants=variants, sweep_seeds=seeds), variants[0].config


def split_variants(text: str) -> list:
    """'bf16,nvfp4:keep-high-precision=patch_embed,blocks.5.*' -> ['bf16', 'nvfp4:keep-high-precision=
    patch_embed,blocks.5.*']: after a variant's last switch keep-high-precision=..., the pieces
    that are no precision (and have no switches) are more of its comma-separated patterns."""
    variants = []
    for piece in text.split(","):
        pattern_list = variants and variants[-1].rpartition(":")[2].startswith("keep-high-precision=")
        if pattern_list and ":" not in piece and piece not in nvfp4.PRECISIONS:
            variants[-1] += "," + piece
        elif piece:
            variants.append(piece)
    return variants


class Variant(NamedTuple):
    """One --compare variant: its text (the report's name for it) and its validated Config."""
    label: str
    config: Config


def parse_seeds(text: Optional[str], seed: int) -> tuple:
    """--seeds 0,1,2 -> (0, 1, 2); without it, (--seed,)."""
    if text is None:
        return (seed,)
    try:
        seeds = tuple(whole_number(s) for s in text.split(","))
    except argparse.ArgumentTypeError:
        raise UsageError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if len(set(seeds)) < len(seeds) or not all(0 <= s < 2 ** 32 for s in seeds):
        raise UsageError(f"--seeds must be distinct integers in [0, 2^32), got {text!r}")
    return seeds


def parse_variant(label: str, ns: dict, device: torch.device, explicit=frozenset()) -> Config:
    """'nvfp4:no-rht:nvfp4-4over6=all' -> the Config of precision nvfp4 with those flags (any flag
    of the precision section but --precision, named without --) on top of the command line's."""
    precision, *switches = label.split(":")
    if precision not in nvfp4.PRECISIONS:
        raise UsageError(f"--compare variant {label!r}: {precision!r} is not a precision ({', '.join(nvfp4.PRECISIONS)})")
    allowed = {flag_of(f.name) for f in fields(PrecisionConfig) if f.name != "name"} | {"--no-amp"}
    argv = []
    for switch in switches:
        key, has_value, value = switch.partition("=")
        if "--" + key not in allowed:
            raise UsageError(f"--compare variant {label!r}: {key!r} is not a precision switch (one of "
                             f"{', '.join(sorted(k[2:] for k in allowed))})")
        argv += ["--" + key] + ([value] if has_value else [])
    parser = build_parser(with_defaults=False)

    def error(message):
        raise UsageError(f"--compare variant {label!r}: {message}")
    parser.error = error
    given = vars(parser.parse_args(argv))
    try:
        config = validate(resolve_config({**variant_flags(ns, precision), **given}, precision, device,
                                         explicit | set(given)))
        # the model's own checks (layer patterns, GEMM shapes) before the first cell trains: on the
        # meta device, which allocates nothing, with the emulated layers (TE's have the same names)
        build_model(config.replace(backend="emulated"), torch.device("meta"), config.optim.batch_size)
        return config
    except UsageError as problem:
        raise UsageError(f"--compare variant {label!r}: {problem}") from None


def variant_flags(ns: dict, name: str) -> dict:
    """The flags of one --compare precision: bf16 always runs under AMP and fp32 without (as
    their own defaults), the NVFP4 switches apply to nvfp4 alone, the quantized ones to fp8 and
    nvfp4."""
    reset = (() if name == "nvfp4" else NVFP4_ONLY) + (QUANTIZED_ONLY if name in ("bf16", "fp32") else ())
    ns = dict(ns, amp=None) if name in ("bf16", "fp32") else ns
    return dict(ns, **{key: PRECISION_DEFAULTS[key] for key in reset})


def resolve_config(ns: dict, name: Optional[str], device: torch.device, explicit=frozenset()) -> Config:
    """One run's Config from the parsed flags, with the per-device defaults filled: AMP and
    compile on GPUs, bf16 with AMP (else fp32), batch 256 on GPUs (32 on CPUs), and the recipe
    switches that TE 2.20 takes from NVTE_* environment variables, where no flag (`explicit`:
    the dests given) set them."""
    on_gpu = device.type == "cuda"
    amp = ns["amp"]
    name = name or ("bf16" if (on_gpu if amp is None else amp) else "fp32")
    amp = {"bf16": True, "fp32": False}.get(name, on_gpu) if amp is None else amp
    batch = ns["batch_size"] if ns["batch_size"] is not None else (256 if on_gpu else 32)
    try:
        environment = {key: found for key, found in nvfp4.recipe_environment(name).items() if key not in explicit}
    except ValueError as error:
        raise UsageError(str(error)) from None

    def section(cls, **resolved):
        return cls(**{**{f.name: ns[f.name] for f in fields(cls) if f.name in ns}, **resolved})

    return Config(
        data=section(DataConfig), model=section(MAEConfig, **MODEL_PRESETS[ns["preset"]]),
        precision=section(PrecisionConfig, name=name, amp=amp, **{key: value for key, (value, _) in environment.items()},
                          from_environment=tuple(source for _, source in environment.values())),
        optim=section(OptimConfig, batch_size=batch),
        run=section(RunConfig, device=str(device), compile=on_gpu if ns["compile"] is None else ns["compile"]))


def validate(config: Config) -> Config:
    """Every check of a run's Config, in one place; raises UsageError naming the flag."""
    d, m, p, o, r = config.data, config.model, config.precision, config.optim, config.run
    world = int(os.environ.get("WORLD_SIZE", 1))
    checks = [
        (o.epochs > 0, f"--epochs must be positive, got {o.epochs}"),
        (o.batch_size > 0, f"--batch-size must be positive, got {o.batch_size}"),
        (o.batch_size % world == 0, f"--batch-size {o.batch_size} does not split over {world} processes"),
        (0 < m.mask_ratio < 1, f"--mask-ratio must be in (0, 1), got {m.mask_ratio}"),
        (m.patch_size > 0 and m.img_size > 0, "--img-size and --patch-size must be positive"),
        (m.patch_size <= 0 or m.img_size % m.patch_size == 0,  # positivity is reported above
         f"--img-size {m.img_size} is not divisible by --patch-size {m.patch_size}"),
        (o.blr > 0, f"--blr must be positive, got {o.blr}"),
        (o.lr is None or o.lr > 0, f"--lr must be positive, got {o.lr}"),
        (o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {o.warmup_epochs}"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
        (0 <= d.num_workers <= 4 * (os.cpu_count() or 1),
         f"--num-workers must be in [0, {4 * (os.cpu_count() or 1)}] (4 per core here), got {d.num_workers}"),
        (r.out_dir.strip() != "", "--out-dir is empty; name a folder (the default is runs)"),
        (r.log_every > 0 and r.save_every > 0 and r.keep_last > 0 and r.max_bad_steps > 0,
         "--log-every, --save-every, --keep-last and --max-bad-steps must be positive"),
        (p.name != "bf16" or p.amp, "--precision bf16 runs under AMP; drop --no-amp or use --precision fp32"),
        (p.name != "fp32" or not p.amp, "--precision fp32 runs without AMP; drop --amp or use --precision bf16"),
        (not switches_set(p, NVFP4_ONLY) or p.name == "nvfp4",
         f"{listed(switches_set(p, NVFP4_ONLY))} to --precision nvfp4 only"),
        (not switches_set(p, QUANTIZED_ONLY) or p.name in ("fp8", "nvfp4"),
         f"{listed(switches_set(p, QUANTIZED_ONLY))} to --precision fp8 and nvfp4 only"),
        (p.high_precision_from is None or 0 < p.high_precision_from < 1,
         f"--high-precision-from must be in (0, 1), got {p.high_precision_from}"),
        (not (p.nvfp4_4over6 in ("activations", "all") and not p.disable_rht),
         f"--nvfp4-4over6 {p.nvfp4_4over6} needs --no-rht: the input's quantizer applies RHT, and TE 2.20 has no "
         f"RHT + 4over6 quantization"),
        (0 <= r.seed < 2 ** 32, f"--seed must be in [0, 2^32), got {r.seed}"),
        (not r.use_wandb or importlib.util.find_spec("wandb") is not None,
         "--use-wandb: wandb is not installed (pip install wandb), or drop --use-wandb"),
        (not r.use_wandb or wandb_can_log(), "--use-wandb: not logged in to W&B (set WANDB_API_KEY or run "
                                             "`wandb login`), or log offline with WANDB_MODE=offline"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if m.num_patches < 2:
        raise UsageError(f"--img-size {m.img_size} / --patch-size {m.patch_size} gives {m.num_patches} patch; "
                         f"MAE masks some patches and sees the rest: take a smaller --patch-size")
    if not 0 < m.num_visible < m.num_patches:
        raise UsageError(f"--mask-ratio {m.mask_ratio} leaves {m.num_visible} of {m.num_patches} patches visible")
    batch_bytes = 4 * (o.batch_size // world) * (3 * m.img_size ** 2 + m.num_patches)  # a lower bound
    on_gpu = r.device.startswith("cuda")
    if batch_bytes > device_memory(r.device):
        raise UsageError(f"--img-size {m.img_size} at --batch-size {o.batch_size}: one batch's images and masking "
                         f"noise alone take {batch_bytes / 2 ** 30:,.1f} GiB in fp32, more than the "
                         f"{device_memory(r.device) / 2 ** 30:,.1f} GiB of {'this GPU' if on_gpu else 'this machine'}")
    if r.run_name is not None:
        check_run_name(r.run_name, r.out_dir)
    return config


def check_run_name(name: str, out_dir: str):
    """A run folder lies strictly inside --out-dir: plain folder names (a, or a/b), each one the
    filesystem takes."""
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in name:
        raise UsageError(f"--run-name {name!r} must be plain folder names (a or a/b) inside --out-dir, "
                         f"without '/' at the start, '.' or '..'")
    longest = max(parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > 255:
        raise UsageError(f"--run-name: a folder name takes at most 255 bytes, {longest[:20]}... has "
                         f"{len(os.fsencode(longest))}")
    length = len(os.fsencode(os.path.abspath(os.path.join(out_dir, name))))
    if length > 4096 - 64:  # PATH_MAX, less room for the run's own file names
        raise UsageError(f"--out-dir and --run-name make a path of {length} bytes; with the run's file names "
                         f"it must stay under 4,096")


def wandb_can_log() -> bool:
    """W&B logs offline (WANDB_MODE), or has an API key: in the environment or from `wandb login`
    (its entry in ~/.netrc)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def device_memory(device: str) -> int:
    """Bytes of memory of the GPU, or of the host."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"--device {name}: the CPU is one device; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
    return device


def resume_config(saved: Config, cli: Config, explicit) -> tuple:
    """A checkpoint's Config with the flags given on this command line applied (the device
    always: a run may move), and the list of changes. Changes to the model, the data or the
    precision are refused, and so are other run folders: the checkpoint's is the run's."""
    flags = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    changes, updates = [], {"device": cli.run.device}
    for key in sorted(explicit - {f.name for f in fields(Command)}):
        old, new = saved.get(key), cli.get(key)
        if old == new:
            continue
        name = flags[key][2:].replace("-", "_")  # as the flag reads: precision, not the field's name
        if key in RESUME_CONFLICTS:
            raise UsageError(f"{flags[key]} {new} conflicts with the checkpoint ({name}={old}); a resumed run "
                             f"keeps its model, data and precision")
        if key in ("out_dir", "run_name", "overwrite"):
            raise UsageError(f"{flags[key]}: --resume and --eval stay in the checkpoint's own folder; drop "
                             f"{flags[key]}")
        changes.append(f"{name} {old} -> {new}")
        updates[key] = new
    return validate(saved.replace(**updates)), changes


# ============================================================================= data

CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def dataset_stats(name):
    """(mean, std) per channel, to normalize images of this dataset."""
    return CIFAR_STATS.get(name, IMAGENET_STATS)


class Split(NamedTuple):
    images: torch.Tensor            # uint8 [N, 3, H, W]
    labels: Optional[torch.Tensor]  # int64 [N], or None


def open_cifar(name, root, train):
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        return cls(root=root, train=train, download=True)
    except Exception as error:  # URLError, OSError, RuntimeError (integrity) ...
        raise UsageError(f"{name} is not in {root} and could not be downloaded ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}). Offline: put {cls.filename} "
                         f"from {cls.url} into {root}/ and rerun") from None


def fake_images(train: bool, seed: int = 0):
    """Random-noise 32x32 images with random labels, generated in one go (not real data)."""
    g = torch.Generator().manual_seed(seed + (0 if train else 1))
    n = 50_000 if train else 10_000
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


IMAGE_FILES = (*IMG_EXTENSIONS, ".gif")  # torchvision's, and GIFs (their first frame)


def rgb8(img: Image.Image) -> Optional[Image.Image]:
    """An 8-bit RGB image of img, its range kept: 16-bit and 32-bit integer images (modes I;16*,
    I; PIL's convert clips them at 255) are scaled by 255 / 65535 where a value exceeds 255;
    float images (mode F; convert truncates them to 0) by 255 if within [0, 1], as they are if
    within [0, 255]; None for any other float range (skipped and counted)."""
    if not img.mode.startswith(("I", "F")):
        return img.convert("RGB")
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I"):
        a = a * (255 / 65535) if a.max(initial=0) > 255 else a
    elif a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
        a = a * 255
    elif not (a.min(initial=0) >= 0 and a.max(initial=0) <= 255):
        return None
    return Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8)).convert("RGB")


def folder_images(root: str, train: bool, size: int):
    """Every readable image under root (recursive), resized (shorter side) and center-cropped
    to size, in 8 bits with its range kept (rgb8). Every 10th file is held out (with fewer than 10,
    none: held-out metrics then use the training images, which the first call says). Labels come
    from first-level subfolders when there are at least two of them; unreadable files are skipped
    and counted, and so are files that are not images."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise UsageError(f"--data-root {root} is not a folder of images")
    every = sorted(f for f in root_path.rglob("*") if f.is_file() and not f.name.startswith("."))
    files = [f for f in every if f.suffix.lower() in IMAGE_FILES]
    if not files:
        raise UsageError(f"--data-root {root} holds no images ({', '.join(IMAGE_FILES)})")
    if train:
        others = sorted({f.suffix.lower() or f.name for f in every} - set(IMAGE_FILES))
        held = len(files) // 10 if len(files) >= 10 else 0
        print(f"[data] {root}: {len(files)} images, {held} held out (every 10th)"
              + ("; fewer than 10, so held-out metrics use the training images" if not held else "")
              + (f"; ignored {len(every) - len(files)} other files ({', '.join(others[:5])})" if others else ""))
    files = [f for i, f in enumerate(files) if (i % 10 == 9) != train] if len(files) >= 10 else files
    classes = sorted({f.relative_to(root_path).parts[0] for f in files if len(f.relative_to(root_path).parts) > 1})
    resize = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    images, labels, skipped = [], [], 0
    for f in files:
        try:
            with Image.open(f) as img:
                rgb = rgb8(img)
                if rgb is None:
                    skipped += 1
                    continue
                images.append(torch.from_numpy(np.array(resize(rgb))).permute(2, 0, 1))
            labels.append(classes.index(f.relative_to(root_path).parts[0]) if len(classes) >= 2 else 0)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):  # too many pixels
            skipped += 1
    if not images:
        raise UsageError(f"--data-root {root}: none of the {len(files)} image files could be read")
    if skipped:
        print(f"[data] skipped {skipped} unreadable file(s) under {root} (corrupt, too large, or float values "
              f"outside [0, 255])")
    return torch.stack(images), (torch.tensor(labels) if len(classes) >= 2 else None)


def load_images(config: Config, train: bool) -> Split:
    """The training (or held-out) split of --dataset."""
    d = config.data
    if d.dataset in CIFAR_STATS:
        ds = open_cifar(d.dataset, d.data_root, train)
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    if d.dataset == "fake":
        images, labels = fake_images(train, config.run.seed)
    else:
        images, labels = folder_images(d.data_root, train, config.model.img_size)
    return Split(images, labels)


def plain_images(images: torch.Tensor, dataset: str, size: int) -> torch.Tensor:
    """uint8 images resized to size x size and normalized, no augmentation (evaluation)."""
    mean, std = dataset_stats(dataset)
    x = images.float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def seed_for(*keys: int) -> int:
    """A well-mixed seed from (seed, epoch, batch, ...): every batch reproducible on its own."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor to `device` without a stream sync (staged in pinned memory)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def masking_noise(seed, epoch, batch_index, global_batch, num_patches, part: slice, device):
    """MAE's per-sample masking noise for one global batch (drawn on the host, so every device
    draws the same); this rank's rows."""
    g = torch.Generator().manual_seed(seed_for(seed, epoch, batch_index, 1))
    return to_device(torch.rand(global_batch, num_patches, generator=g)[part], device)


class TensorLoader:
    """The whole uint8 dataset as one tensor on the training device (pinned host memory when it
    would take over a quarter of the GPU). Per batch: indices from a per-epoch permutation,
    per-sample augmentation parameters and masking noise drawn for the global batch from a
    (seed, epoch, batch) generator on the host, so CPU and GPU runs draw the same batches, of
    which this rank takes its slice; per step only these parameters are copied from the host.
    On the GPU one Triton kernel crops, flips, resizes, jitters and normalizes the batch
    (augment_kernel.py; with --randaugment, RandAugment and normalization follow it, compiled);
    on the CPU augment.py's ops run. The batch's kernels run on the training stream, between
    steps: on a side stream they would compete with the step for the GPU and gain nothing."""

    def __init__(self, images, config: Config, rank=0, world=1):
        self.device = torch.device(config.run.device)
        on_gpu = self.device.type == "cuda"
        fits = on_gpu and images.numel() < 0.25 * torch.cuda.get_device_properties(self.device).total_memory
        self.images = images.to(self.device) if fits else (images.pin_memory() if on_gpu else images)
        self.batch = config.optim.batch_size
        self.local, self.rank, self.seed = self.batch // world, rank, config.run.seed
        self.size, self.num_patches = config.model.img_size, config.model.num_patches
        self.randaugment = config.data.randaugment
        self.kernel = on_gpu and augment_kernel is not None
        # augment.py's ops (after the GPU kernel: RandAugment); compiled, their ~400 small kernels
        # fuse into a few (host-bound otherwise)
        torch_ops = self._rand_augment if self.kernel else self._augment
        self.augment_fn = torch.compile(torch_ops, dynamic=False) if config.run.compile else torch_ops
        mean, std = dataset_stats(config.data.dataset)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __len__(self):
        return len(self.images) // self.batch

    def _make(self, perm, epoch, b):
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch, b))
        lo = b * self.batch + self.rank * self.local
        idx = perm[lo:lo + self.local]
        if self.images.device != self.device:
            imgs = to_device(self.images.index_select(0, idx.cpu()), self.device)
        else:
            imgs = self.images.index_select(0, idx)
        part = slice(self.rank * self.local, (self.rank + 1) * self.local)
        params = augment.sample_params(self.batch, *self.images.shape[-2:], g, self.randaugment)
        params = {k: to_device(v[part], self.device) for k, v in params.items()}
        noise = masking_noise(self.seed, epoch, b, self.batch, self.num_patches, part, self.device)
        if not self.kernel:
            return self.augment_fn(imgs, params), noise
        if not self.randaugment:
            return augment_kernel.crop_flip_jitter(imgs, params, self.size, self.mean, self.std), noise
        return self.augment_fn(augment_kernel.crop_flip_jitter(imgs, params, self.size), params), noise

    def _augment(self, imgs, params):
        return (augment.apply(imgs, params, self.size) - self.mean) / self.std

    def _rand_augment(self, x, params):
        return (augment.rand_augment(x, params) - self.mean) / self.std

    def epoch(self, epoch: int, start: int = 0):
        """Yield (normalized images, masking noise) for batches start.. of this epoch."""
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(seed_for(self.seed, epoch)))
        perm = to_device(perm, self.images.device)  # a plain copy would wait for the GPU to drain
        for b in range(start, len(self)):
            yield self._make(perm, epoch, b)


class TensorImages(torch.utils.data.Dataset):
    """uint8 images [N, 3, H, W] (+ labels) as a torchvision-style dataset of PIL images."""

    def __init__(self, images: torch.Tensor, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        label = -1 if self.labels is None else int(self.labels[i])
        return (self.transform(img) if self.transform else img), label


class TorchvisionLoader:
    """The seed script's pipeline: PIL transforms in DataLoader workers, same shard and noise rules."""

    def __init__(self, train: Split, config: Config, rank=0, world=1):
        mean, std = dataset_stats(config.data.dataset)
        size = config.model.img_size
        tfm = [transforms.RandomResizedCrop(size, scale=augment.CROP_SCALE), transforms.RandomHorizontalFlip(),
               transforms.ColorJitter(*augment.JITTER)]
        tfm += [transforms.RandAugment()] if config.data.randaugment else []
        tfm = transforms.Compose(tfm + [transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.dataset, self.rank, self.world = TensorImages(*train, tfm), rank, world
        self.seed, self.num_workers = config.run.seed, config.data.num_workers
        self.batch = config.optim.batch_size
        self.local, self.num_patches = self.batch // world, config.model.num_patches
        self.device = torch.device(config.run.device)
        self.wait_s = 0.0  # host time blocked on the workers (the GPU has nothing queued then)

    def __len__(self):
        return len(self.dataset) // self.batch

    def epoch(self, epoch: int, start: int = 0):
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed_for(self.seed, epoch)))
        order = perm[:len(self) * self.batch].view(len(self), self.world, self.local)[:, self.rank].flatten().tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.local, sampler=order, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(seed_for(self.seed, epoch, 1 << 20, self.rank)))
        part = slice(self.rank * self.local, (self.rank + 1) * self.local)
        batches = iter(loader)
        for b in range(len(self)):
            t0 = time.perf_counter()
            imgs, _ = next(batches)
            self.wait_s += time.perf_counter() - t0
            if b < start:
                continue
            noise = masking_noise(self.seed, epoch, b, self.batch, self.num_patches, part, self.device)
            yield imgs.to(self.device, non_blocking=True), noise


def make_loader(config: Config, train: Split, rank=0, world=1):
    """The --loader of training and the benchmark."""
    if config.data.loader == "tensor":
        return TensorLoader(train.images, config, rank, world)
    return TorchvisionLoader(train, config, rank, world)


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

    def target(self, imgs):
        target = patchify(imgs, self.cfg.patch_size)
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
        latent = self.forward_encoder(patchify(imgs, self.cfg.patch_size), ids_shuffle[:, :self.cfg.num_visible])
        x = self.embed_decoder(latent, ids_restore)
        for block in self.decoder_blocks:
            x = block(x)
        return self.predict_and_loss(x, imgs, ids_restore)

    def features(self, imgs):
        """Encoder cls-token features of whole (unmasked) images, for the linear probe and kNN."""
        ids = torch.arange(self.cfg.num_patches, device=imgs.device).expand(len(imgs), -1)
        return self.forward_encoder(patchify(imgs, self.cfg.patch_size), ids)[:, 0]


def check_mask(mask: torch.Tensor, batch: int, num_patches: int, num_masked: int) -> None:
    """MAE mask sanity: shape [B, L], binary, exactly `num_masked` ones per sample."""
    if tuple(mask.shape) != (batch, num_patches):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({batch}, {num_patches})")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask is not binary")
    per_sample = mask.sum(1)
    if not (per_sample == num_masked).all():
        raise ValueError(f"mask has {per_sample.min().item():.0f}..{per_sample.max().item():.0f} "
                         f"masked patches per sample, expected exactly {num_masked}")


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
    if p.name == "nvfp4":
        recipe = nvfp4.NVFP4Recipe(**{f.name: getattr(p, f.name) for f in fields(nvfp4.NVFP4Recipe)})
    elif p.name == "fp8":
        recipe = nvfp4.FP8Recipe(backward_override=p.backward_override)
    try:
        return nvfp4.Precision.resolve(p.name, device, p.backend, p.amp, recipe, p.keep_high_precision)
    except nvfp4.BackendError as error:
        raise UsageError(str(error)) from None


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
                             f"{nvfp4.precision.compact_names(layers.names)}")
        check_gemm_shapes(model, precision.recipe, batch_per_rank)
    return model, precision


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
    """Per-iteration linear warmup, then half-cycle cosine to 0 (MAE's schedule)."""
    epoch = step / steps_per_epoch
    if epoch < optim.warmup_epochs:
        return optim.peak_lr * epoch / optim.warmup_epochs
    progress = (epoch - optim.warmup_epochs) / max(optim.epochs - optim.warmup_epochs, 1e-9)
    return optim.peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def compile_model(model: MAE, model_graphs: bool):
    """Regional compilation, in place (PyTorch's recipe for models of repeated blocks): the blocks
    of one shape share one compiled graph, and the three pieces of glue around them compile once
    each, so a cold compile traces each block shape once instead of the whole unrolled model
    (README: Speed, "Compile"), for the same step time.
    model_graphs: CUDA graphs per region (mode="reduce-overhead") for single-GPU runs whose step
    TrainStep cannot capture whole (TE, fp16's GradScaler). Evaluation, reconstructions and
    --fp4-stats passes see other shapes, so they run the same modules eagerly
    (set_stance("force_eager")) rather than compile again."""
    options = dict(mode="reduce-overhead" if model_graphs else None, dynamic=False)
    for block in (*model.blocks, *model.decoder_blocks):
        block.compile(**options)
    for name in ("embed_visible", "embed_decoder", "predict_and_loss"):
        setattr(model, name, torch.compile(getattr(model, name), **options))


def start_compile_workers():
    """Call before loading data. Inductor compiles each graph's Triton kernels in a pool of worker
    processes, which it starts at its first compile and which takes seconds to come up (each
    worker imports torch); until then it compiles them one at a time in this process. Started
    here, the pool comes up while the data loads."""
    from torch._inductor.async_compile import maybe_warm_pool
    maybe_warm_pool()


def stop_compile_workers():
    """Call once the first steps have compiled. With a warm cache the model compiles before the
    pool of compile workers (one per CPU) has finished starting, and for seconds the workers then
    take the CPUs the data loader needs. A later compile would start them again."""
    from torch._inductor.async_compile import shutdown_compile_workers
    shutdown_compile_workers()


class NonFiniteLossError(RuntimeError):
    pass


class LossGuard:
    """Skip optimizer steps whose loss or gradient norm is not finite, without a host sync.

    `update` returns a 0/1 device tensor for the fused optimizer's `found_inf` (the step is
    then a no-op); the counters live on the device and `check` reads them when the host syncs
    anyway (at log time), stopping the run after `max_consecutive` bad steps in a row.
    """

    def __init__(self, max_consecutive: int, device):
        self.max_consecutive = max_consecutive
        zero = torch.zeros((), device=device, dtype=torch.int64)
        self.skipped, self.streak, self.trigger_step = zero.clone(), zero.clone(), zero - 1

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor, step) -> torch.Tensor:
        """step: int or device tensor. The counters change in place (a CUDA graph replays this)."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.skipped.add_(bad)
        self.streak.add_(1).mul_(bad)
        first_trigger = (self.streak == self.max_consecutive) & (self.trigger_step < 0)
        self.trigger_step.copy_(torch.where(first_trigger, step - self.max_consecutive + 1, self.trigger_step))
        return bad.to(torch.float32)

    def skipped_steps(self) -> int:
        return int(self.skipped.item())

    def check(self) -> None:
        start = int(self.trigger_step.item())
        if start >= 0:
            raise NonFiniteLossError(
                f"loss or gradient was not finite at step {start} and the "
                f"{self.max_consecutive - 1} steps after it; those steps were skipped, "
                f"so the weights are those of step {start - 1}")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.cpu(), "streak": self.streak.cpu(),
                "trigger_step": self.trigger_step.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("skipped", "streak", "trigger_step"):
            setattr(self, key, state[key].to(self.skipped.device))


class TrainStep:
    """One optimizer step of the MAE, called with a batch: model, optimizer, scaler, loss guard.

    On one GPU with compile on (PyTorch backend, no GradScaler), the whole step (forward,
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
        self.graph, self.warm_steps, self.static_inputs, self.static_outputs = None, 0, None, None

    def __call__(self, imgs, noise, lr: float, step: int):
        """Optimizer step number `step` (from 1); returns loss, grad norm, skipped (0/1), mask
        (with CUDA graphs: the graph's output tensors, overwritten by the next step)."""
        self._set_lr(lr)
        self.step_number.fill_(step)
        if not self.graphed:
            return self._step(imgs, noise)
        if self.graph is None and self.warm_steps < 2:  # compile, then capture (CUDA's recipe)
            self.warm_steps += 1
            side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self._step(imgs, noise)
            main.wait_stream(side)
            return out
        if self.graph is None:
            self.static_inputs = (imgs.clone(), noise.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = self._step(*self.static_inputs)
        self.static_inputs[0].copy_(imgs)
        self.static_inputs[1].copy_(noise)
        self.graph.replay()
        return self.static_outputs

    @property
    def unquantized(self) -> bool:
        """Whether a precision schedule switched this step's quantized layers to high precision."""
        return self.precision.recipe is None and self.precision.name in ("fp8", "nvfp4")

    def to_high_precision(self):
        """The precision schedule's switch (--high-precision-from): the linear layers run unquantized
        (in the AMP dtype) from the next step on; parameters, optimizer state and data order stay.
        A compiled model recompiles once (the layers' recipe is an attribute its guards read), and
        a captured step is captured again."""
        nvfp4.linear.drop_quantization(self.model)
        self.precision = self.precision.unquantized()
        self.graph, self.warm_steps, self.static_inputs, self.static_outputs = None, 0, None, None

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
            loss, _, mask = self.net(imgs, noise)
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
        return loss.detach(), grad_norm, found_inf, mask


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
        for kind in ("interval", "epoch"):
            self.sums[f"{kind}_loss"] += torch.nan_to_num(loss) * good
            self.sums[f"{kind}_count"] += good

    def take_mean(self, kind: str, world: int) -> Optional[float]:
        """The mean loss since the last take (over all ranks), None if the guard skipped every
        step; the sums start again from zero."""
        total = torch.stack([self.sums[f"{kind}_loss"], self.sums[f"{kind}_count"]])
        if world > 1:
            dist.all_reduce(total)
        self.sums[f"{kind}_loss"].zero_()
        self.sums[f"{kind}_count"].zero_()
        count = total[1].item()
        return total[0].item() / count if count else None  # None: every step was skipped

    def state_dict(self, epoch: int, batch: int) -> dict:
        return {"epoch": epoch, "batch": batch, "step": self.step,
                "sums": {k: v.item() for k, v in self.sums.items()}}


class StopRequest:
    """SIGINT/SIGTERM: finish the current step (or part), checkpoint, exit. A second Ctrl-C exits at once."""

    def __init__(self, what: str = "finishing this step, then checkpoint and exit"):
        self.signal, self.what = None, what
        self.previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            os._exit(130)
        self.signal = sig
        tqdm.write(f"[stop] {signal.Signals(sig).name}: {self.what} (Ctrl-C again to quit now)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, sig, checkpoint, what="checkpoint"):
        super().__init__(f"stopped by {signal.Signals(sig).name}; {what} {checkpoint}")
        self.sig, self.checkpoint = sig, checkpoint


class TrainingLoop:
    """One training run: data, train step, run folder, log and progress; `train` runs the epochs.
    run_dir and ckpt: the folder and checkpoint of a resumed run."""

    def __init__(self, config: Config, rank=0, world=1, run_dir=None, ckpt=None, resume_changes=()):
        if rank == 0 and ckpt is not None:
            claim_folder(run_dir)  # one process at a time goes on with a run
        if rank == 0 and ckpt is None:  # claimed before the data loads, written once the run can start
            run_dir = plan_run_dir(config)
            config = config.replace(run_name=str(run_dir.relative_to(config.run.out_dir)))  # the name used
        self.config, self.rank, self.world, self.run_dir = config, rank, world, run_dir
        self.device = torch.device(config.run.device)
        seed = config.run.seed
        seed_everything(seed_for(seed, rank))
        self.train_split, self.heldout_split = load_images(config, train=True), load_images(config, train=False)
        if len(self.train_split.images) < config.optim.batch_size:
            raise UsageError(f"--batch-size {config.optim.batch_size} is larger than the "
                             f"{len(self.train_split.images)} training images")
        self.loader = make_loader(config, self.train_split, rank, world)
        torch.manual_seed(seed)  # the same initial weights on every rank and backend
        self.train_step = TrainStep(config, self.device, world)
        seed_everything(seed_for(seed, rank))  # per-rank streams again (stochastic rounding)
        self.progress = Progress(self.device, ckpt["progress"] if ckpt else None)
        if ckpt is not None:
            self._restore(ckpt)
        self.complete = self.progress.epoch >= config.optim.epochs  # a finished run, resumed
        if rank == 0 and ckpt is None:
            make_run_dir(run_dir, config.run.overwrite)
            (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        elif rank == 0 and not self.complete:
            truncate_metrics(run_dir / "metrics.jsonl", self.progress.step)
        self.log = RunLog(run_dir, config, rank == 0)
        self.summary = {"curve": [], "epoch_curve": [], "epoch_img_per_s": [], "run_dir": str(self.run_dir),
                        "backend": self.train_step.precision.backend_name}
        self.fp4_rows = {}
        if ckpt is not None and rank == 0:
            self._restore_summary()
        self._announce(resume_changes, ckpt is not None)
        f = config.precision.high_precision_from  # the last step in the run's precision
        self.high_precision_step = None if f is None else math.floor(f * config.optim.epochs * len(self.loader))
        self.workers_stop_step = None if f is None else self.high_precision_step + 3  # once it recompiled
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

    def _restore_summary(self):
        """A resumed run's loss curves so far (and a finished run's final numbers and grid) from its
        metrics.jsonl, so that its summary covers the whole run."""
        path = self.run_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("type") == "step" and record.get("loss") is not None:
                self.summary["curve"].append((record["step"], record["loss"]))
            elif record.get("type") == "epoch":
                self._add_epoch(record)
        recon = self.run_dir / "recons" / f"final_recon_ep{self.config.optim.epochs:04d}.png"
        if self.complete and recon.exists():
            self.summary["recon"] = str(recon)

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
            if self.rank == 0 and "recon" not in self.summary:  # stopped between the last checkpoint and grid
                self._final_grid()
            self.log.close()
            return self.summary
        stop = StopRequest()
        stop.install()
        self.start_time = time.perf_counter()
        if self.device.type == "cuda":  # the summary's peak is this run's (a sweep trains many in one process)
            torch.cuda.reset_peak_memory_stats(self.device)
        epochs, save_every = self.config.optim.epochs, self.config.run.save_every
        try:
            for epoch in range(self.progress.epoch, epochs):
                self._epoch(epoch, stop)
                if self.rank == 0 and ((epoch + 1) % save_every == 0 or epoch + 1 == epochs):
                    self.summary["checkpoint"] = str(self._checkpoint(epoch + 1, 0))
            self._finish()
        except NonFiniteLossError as error:
            self.log.print(f"[stop] {error}. Last good checkpoint: {latest_checkpoint(self.run_dir) or 'none yet'}")
            self.log.close()
            raise
        finally:
            stop.restore()
        if stop.signal is not None:  # it came while the final checkpoint or grid was written: both were
            raise Interrupted(stop.signal, self.summary.get("checkpoint"))
        return self.summary

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
            loss, grad_norm, bad, mask = self.train_step(imgs, noise, lr_at(p.step, steps, o), p.step + 1)
            p.step += 1
            p.add(loss, bad)
            seen, interval_seen = seen + o.batch_size, interval_seen + o.batch_size
            bar.update(1)
            if p.step == 3 and "warmup_s" not in self.summary:
                self._report_warmup()
            elif self.config.run.compile and p.step == self.workers_stop_step:
                stop_compile_workers()  # the switch's recompile started them again (see the function)
            if b == first:  # the bar shows loss from its first step on (one sync an epoch)
                shown = dict(loss=f"{loss.item():.4f}")
            shown["lr"] = f"{lr_at(p.step - 1, steps, o):.2e}"  # every step's (host arithmetic, no sync)
            bar.set_postfix(shown, refresh=False)
            if p.step % self.config.run.log_every == 0:
                m = self.config.model
                check_mask(mask, len(imgs), m.num_patches, m.num_patches - m.num_visible)
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
        amp = self.train_step.precision.amp_dtype
        dtype = str(amp).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16") if amp else "fp32"
        first, total = self.high_precision_step + 1, self.config.optim.epochs * len(self.loader)
        self.log.print(f"[precision] steps {first}-{total}: linear layers unquantized in {dtype} "
                       f"(--high-precision-from {self.config.precision.high_precision_from:g})")
        if not resumed:
            self.log.metrics({"type": "precision", "step": first, "gemm": dtype})
        self.summary["high_precision_from_step"] = first

    def _report_warmup(self):
        if self.config.run.compile:
            stop_compile_workers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.summary["warmup_s"] = time.perf_counter() - self.start_time
        what = "compile warm-up" if self.config.run.compile else "no compile"
        self.log.print(f"[speed] first 3 steps ({what}) took {self.summary['warmup_s']:.1f} s")

    def _log_step(self, epoch, lr, grad_norm, img_per_s, imgs, noise) -> dict:
        self.train_step.guard.check()
        record = {"type": "step", "step": self.progress.step, "epoch": epoch + 1,
                  "loss": self.progress.take_mean("interval", self.world), "lr": lr, "grad_norm": grad_norm.item(),
                  "skipped_steps": self.train_step.guard.skipped_steps(), "img_per_s": img_per_s}
        self.log.metrics(record)
        if record["loss"] is not None:  # None: the guard skipped every step since the last record
            self.summary["curve"].append((record["step"], record["loss"]))
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
        self._add_epoch(record)

    def _add_epoch(self, record: dict):
        """The summary's epoch curve, final loss and speed: the median epoch's img/s (an epoch
        that compiles, or the one a precision schedule recompiles in, is an outlier); an epoch
        without a loss (all skipped) or a speed (resumed at its end) adds neither."""
        if record["loss"] is not None:
            self.summary["epoch_curve"].append((record["step"], record["loss"]))
            self.summary["final_loss"] = record["loss"]
        if record.get("img_per_s") is not None:
            self.summary["epoch_img_per_s"].append(record["img_per_s"])
            self.summary["img_per_s"] = statistics.median(self.summary["epoch_img_per_s"])

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

    def _final_grid(self):
        png = save_reconstructions(self.train_step, self.config, self.heldout_split.images, self.run_dir,
                                   f"final_recon_ep{self.config.optim.epochs:04d}")
        self.summary["recon"] = str(png)
        self.log.print(f"[final] reconstructions: {png} (rows: original | visible | reconstruction)")

    def _finish(self):
        if self.rank == 0:
            self._final_grid()
            if self.fp4_rows:
                self.summary["fp4_stats"] = summarize_fp4(self.fp4_rows, self.log)
        if self.device.type == "cuda":
            self.summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
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
    return summary


# ============================================================================= outputs

class RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch reports one as
    RuntimeError('unexpected pos'), which does not say why (e.g. a full disk)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def atomic_write_text(path: Path, text: str):
    """path's new text, or its old one after a crash: written beside it, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(obj, path: Path):
    """torch.save to a temp file, fsync, rename: a crash never leaves a truncated file. A failed
    write removes the temp file and raises the write's OSError."""
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and writer is not None and writer.error is not None:
            raise writer.error from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state(device):
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoints(run_dir: Path) -> list:
    """A run folder's checkpoints, oldest first."""
    return sorted(Path(run_dir).glob("checkpoint_step*.pt"))


def latest_checkpoint(run_dir) -> Optional[Path]:
    """A run folder's newest checkpoint, or None (also without a folder: DDP ranks > 0)."""
    found = checkpoints(run_dir) if run_dir else []
    return found[-1] if found else None


def save_checkpoint(train_step: TrainStep, config: Config, run_dir: Path, progress: dict) -> Path:
    """model, optimizer, scaler, loss guard, progress (epoch, batch, step, running sums), config, RNG,
    and whether the precision schedule has switched the linear layers to high precision."""
    t = train_step
    state = {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
             "scaler": t.scaler.state_dict() if t.scaler else None, "guard": t.guard.state_dict(),
             "progress": progress, "config": asdict(config), "rng": rng_state(t.device),
             "unquantized": t.unquantized}
    path = run_dir / f"checkpoint_step{progress['step']:08d}.pt"
    try:
        atomic_save(state, path)
    except OSError as error:
        last = latest_checkpoint(run_dir)  # path itself was not written
        why = "no space left on device" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
        raise UsageError(f"{why} writing {path}; the last good checkpoint is {last or 'none'}"
                         f"{f' (--resume {run_dir})' if last else ''}") from None
    for old in checkpoints(run_dir)[:-config.run.keep_last]:
        old.unlink()
    return path


def truncate_metrics(path: Path, step: int):
    """Drop metrics.jsonl's records after `step`, where a resumed run starts: a run killed after
    its last checkpoint had logged them, and the resumed run logs them again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", math.inf) <= step:  # fp4_summary (the run's end) has no step
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def find_checkpoint(path: str, flag: str) -> Path:
    """The checkpoint file, or a run folder's newest; flag (--resume, --eval) names the error."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise UsageError(f"{flag} {path}: no checkpoint_step*.pt in this folder")
        return found
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such checkpoint file or run folder")
    return p


def load_checkpoint(path: Path) -> tuple:
    """(checkpoint dict, its Config). A checkpoint is untrusted input: weights_only=True
    unpickles tensors and plain data only."""
    try:
        with warnings.catch_warnings():  # torch's own lines about legacy formats: the refusal below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"checkpoint {path} cannot be read: corrupt, truncated or not a checkpoint "
                         f"({type(error).__name__})") from None
    if isinstance(ckpt, dict) and "args" in ckpt and "config" not in ckpt:
        raise UsageError(f"checkpoint {path} was written by an earlier asmae_minimal.py (flat 'args', not a "
                         f"'config'); resume or evaluate it with that version")
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        raise UsageError(f"checkpoint {path} is not from asmae_minimal.py (missing {', '.join(sorted(missing))})")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UsageError(f"checkpoint {path}: {problem}")
    try:
        return ckpt, Config.from_dict(ckpt["config"])
    except (TypeError, KeyError, AttributeError) as error:
        raise UsageError(f"checkpoint {path} holds a config this version cannot read ({error})") from None


CHECKPOINT_KEYS = {"model", "optimizer", "config", "progress", "rng", "guard", "scaler"}


def checkpoint_problem(ckpt: dict) -> Optional[str]:
    """What in a checkpoint (untrusted input) has the wrong type, range or shape of what
    save_checkpoint writes, naming the field; None if nothing: checked before a run writes anything."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_number = lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v)
    fits = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool), int: is_int, float: is_number,
            str: lambda v: isinstance(v, str),
            tuple: lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)}
    if not isinstance(ckpt["config"], dict):
        return "config is not a table of sections"
    for section, cls in SECTIONS.items():
        values = ckpt["config"].get(section)
        if not isinstance(values, dict):
            return f"config.{section} is missing"
        for f in fields(cls):
            kinds = typing.get_args(f.type) or (f.type,)
            if f.name in values and not any(fits.get(kind, lambda v: True)(values[f.name]) for kind in kinds):
                expected = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
                return f"config.{section}.{f.name} is {values[f.name]!r}; expected {expected}"
    run = ckpt["config"]["run"]
    try:
        check_run_name(run.get("run_name") or "run", run.get("out_dir") or "runs")
    except UsageError:
        return f"config.run.run_name {run.get('run_name')!r} is not a plain folder name inside its --out-dir"
    progress = ckpt["progress"]
    if not isinstance(progress, dict) or not all(is_int(progress.get(k)) and progress[k] >= 0
                                                 for k in ("epoch", "batch", "step")):
        return f"progress {progress!r} is not epoch, batch and step counts (integers >= 0)"
    sums = progress.get("sums", {})
    if not isinstance(sums, dict) or not all(k in Progress.SUMS and is_number(v) for k, v in sums.items()):
        return "progress.sums is not a table of finite loss sums"
    rng = ckpt["rng"]
    if not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng) and torch.is_tensor(rng["torch"])
            and rng["torch"].dtype == torch.uint8 and (rng.get("cuda") is None or torch.is_tensor(rng["cuda"]))):
        return "rng is not the random generators' states"
    guard = ckpt["guard"]
    if not (isinstance(guard, dict) and all(torch.is_tensor(guard.get(k)) and guard[k].numel() == 1
                                            for k in ("skipped", "streak", "trigger_step"))):
        return "guard is not the loss guard's three counters"
    if not isinstance(ckpt["model"], dict) or not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        return "model is not a table of tensors"
    if not isinstance(ckpt["optimizer"], dict) or not {"state", "param_groups"} <= set(ckpt["optimizer"]):
        return "optimizer is not an optimizer's state"
    return None


def load_model_state(model, state: dict, source: str):
    """Load weights from either backend: TE's `_extra_state` entries carry no weights."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise UsageError(f"{source} holds a different model ({len(wrong)} mismatched tensors, e.g. {wrong[0]})")
    model.load_state_dict(state, strict=False)


def strict_json(obj, **kwargs) -> str:
    """json.dumps with NaN and infinities written as null, as strict JSON parsers require (Python
    writes NaN, which they reject)."""
    def finite(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


class RunLog:
    """metrics.jsonl (appended), stdout lines and optional W&B, written by rank 0 only."""

    def __init__(self, run_dir: Path, config: Config, active: bool):
        self.active, self.wandb = active, None
        self.file = open(run_dir / "metrics.jsonl", "a") if active else None
        if active and config.run.use_wandb:
            import wandb
            self.wandb = wandb.init(project=config.run.wandb_project, name=run_dir.name, dir=str(run_dir),
                                    config=config.flat(), resume="allow")

    def metrics(self, record: dict):
        if not self.active:
            return
        self.file.write(strict_json(record) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float)) and k != "type"}, step=record.get("step"))

    def print(self, line: str):
        if self.active:
            tqdm.write(line)

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


# What this program writes in a run folder; a compare folder also holds run folders.
RUN_FILES = (LOCK_FILE := ".lock", "config.json", "metrics.jsonl", "checkpoint_step*.pt", "checkpoint_step*.pt.tmp",
             "eval_*.json", "recons", "compare", "wandb", "cell.json", "cell_eval.json", "cell*.json.tmp")


def plan_run_dir(config: Config, kind: Optional[str] = None) -> Path:
    """The run folder, claimed (claim_folder) before any data loads: OUT_DIR/RUN_NAME, which must
    be empty or, with --overwrite, a run folder of this program's; or a new OUT_DIR/dataset-model-
    KIND-timestamp (KIND: the precision, or 'compare'). Its parent must take new folders."""
    r, out = config.run, Path(config.run.out_dir)
    if not r.run_name:
        kind = kind or config.precision.name
        base = out / f"{config.data.dataset}-{config.model.preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_writable(base)
        for n in itertools.count(1):  # an exclusive mkdir: two runs in one second take two names
            run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
            if claim_folder(run_dir, exclusive=True):
                return run_dir
    run_dir = out / r.run_name
    if run_dir.resolve() == out.resolve() or not run_dir.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"--run-name {r.run_name} leads out of --out-dir {out} (through a link)")
    check_writable(run_dir)
    claim_folder(run_dir)
    if any(entry.name != LOCK_FILE for entry in run_dir.iterdir()):
        if not r.overwrite:
            raise UsageError(f"{run_dir} exists; pass --overwrite to replace it, another --run-name, "
                             f"or --resume {run_dir} to continue it")
        foreign = foreign_entry(run_dir)
        if foreign:
            raise UsageError(f"--overwrite deletes only run folders of asmae_minimal.py, and {run_dir} holds "
                             f"{foreign}; move it, or choose another --run-name")
    return run_dir


CLAIMED = {}  # resolved run folder -> (its open lock file, the folders claim_folder made for it)


def claim_folder(folder: Path, exclusive: bool = False) -> bool:
    """Make `folder` (and missing parents) and hold an exclusive lock on folder/.lock until
    release_folders, so that two runs never share a folder: a second run (or resume, or sweep)
    exits 2 naming the first. The lock is the kernel's (flock), so a killed run leaves none
    behind. exclusive: False, instead of claiming, if the folder already exists."""
    key = folder.resolve()
    if key in CLAIMED:
        return True
    made = [p for p in (folder, *folder.absolute().parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=not exclusive)
    except FileExistsError:
        return False
    while True:
        lock = open(folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(f"{folder} is in use by {holder}; wait for it to end, or choose another "
                             f"--run-name") from None
        try:  # a run that ended unlinked the file it held: a lock on that one would claim nothing
            if os.stat(folder / LOCK_FILE).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} ({' '.join(sys.argv[:1] + sys.argv[1:6])}...)\n")
    lock.flush()
    CLAIMED[key] = (lock, made)
    return True


def release_folders():
    """Release every claimed folder: the lock file goes, and a folder that holds nothing else
    (a run that failed before it started) goes with the parents claim_folder made for it."""
    for folder, (lock, made) in list(CLAIMED.items()):
        (folder / LOCK_FILE).unlink(missing_ok=True)
        lock.close()
        for path in reversed(made):
            try:
                path.rmdir()  # only if empty
            except OSError:
                break
        del CLAIMED[folder]


def foreign_entry(folder: Path) -> Optional[str]:
    """What in `folder` this program did not write ('no config.json' if it is no run folder), or None."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    for entry in sorted(folder.iterdir()):
        ours = any(fnmatch.fnmatch(entry.name, pattern) for pattern in RUN_FILES)
        if not ours and not (entry.is_dir() and not entry.is_symlink() and foreign_entry(entry) is None):
            return entry.name
    return None


def check_writable(path: Path):
    """path (a file or folder to make) can be made: its nearest existing ancestor is a folder
    this process may write in."""
    ancestor = next(a for a in (path, *path.absolute().parents) if a.exists())
    if not ancestor.is_dir():
        raise UsageError(f"{ancestor} is a file, not a folder; choose another --out-dir or --run-name")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as error:
        raise UsageError(f"cannot write in {ancestor} ({error.strerror}); choose another --out-dir") from None


def make_run_dir(run_dir: Path, overwrite: bool):
    """Empty the folder plan_run_dir claimed for --overwrite (after the data loaded: a failed
    start deletes nothing), keeping its lock."""
    if overwrite:
        for entry in run_dir.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def reconstruct(model: MAE, imgs, noise, precision: nvfp4.Precision, dataset: str):
    """(loss, originals, visible-only, reconstruction with visible patches pasted in, mask),
    de-normalized with `dataset`'s statistics."""
    p = model.cfg.patch_size
    with precision.autocast():
        loss, pred, mask = model(imgs, noise)
    pred, target = pred.float(), patchify(imgs, p)
    if model.cfg.norm_pix_loss:  # back to pixels with each patch's own statistics, as MAE's visualization
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask.unsqueeze(-1)
    mean, std = (torch.tensor(s, device=imgs.device).view(1, 3, 1, 1) for s in dataset_stats(dataset))
    show = lambda patches: (unpatchify(patches.contiguous(), p) * std + mean).clamp(0, 1)
    return loss.item(), show(target), show(target * (1 - m)), show(pred * m + target * (1 - m)), mask


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


# ============================================================================= evaluation

@torch.no_grad()
def heldout_metrics(model: MAE, images, precision: nvfp4.Precision, dataset: str, seed: int, limit=10_000, batch=256):
    """Masked-patch MSE (normalized space) and PSNR of masked pixels in [0, 1], fixed masks."""
    device, cfg = next(model.parameters()).device, model.cfg
    g = torch.Generator().manual_seed(seed_for(seed, 7))
    loss_sum, sq_err, pixels, n = 0.0, 0.0, 0.0, min(limit, len(images))
    for start in range(0, n, batch):
        imgs = plain_images(images[start:min(start + batch, n)], dataset, cfg.img_size).to(device)
        noise = torch.rand(len(imgs), cfg.num_patches, generator=g).to(device)
        loss, originals, _, recon, mask = reconstruct(model, imgs, noise, precision, dataset)
        pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, cfg.patch_size ** 2 * 3).contiguous(), cfg.patch_size)
        sq_err += ((recon - originals).square() * pixel_mask).sum().item()
        pixels += pixel_mask.sum().item()
        loss_sum += loss * len(imgs)
    return {"heldout_loss": loss_sum / n, "psnr_masked": psnr(sq_err / max(pixels, 1))}


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def extract_features(model: MAE, images, precision: nvfp4.Precision, dataset: str, batch=512):
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(images), batch):
        with precision.autocast():
            x = plain_images(images[start:start + batch], dataset, model.cfg.img_size).to(device)
            feats.append(model.features(x).float())
    return torch.cat(feats)


def linear_probe(train_x, train_y, test_x, test_y, epochs=50, seed=0):
    """MAE's protocol on frozen features: BatchNorm without affine, then a linear head (AdamW with
    cosine decay here instead of LARS)."""
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], classes))
    head = head.to(train_x.device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    steps = max(1, epochs * math.ceil(len(train_x) / 256))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), device=train_x.device).split(256):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07):
    """Weighted kNN on cosine similarity (exp(sim / T) votes, as DINO)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for chunk, labels in zip(test_x.split(1024), test_y.split(1024)):
        sim, idx = (chunk @ train_x.t()).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(chunk), classes, device=chunk.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == labels).sum().item()
    return correct / len(test_x)


def evaluate(model: MAE, precision: nvfp4.Precision, config: Config, train: Split, heldout: Split,
             finetune: Optional["Finetune"] = None, done: Optional[dict] = None, finished=None) -> dict:
    """Held-out loss and PSNR; with labels, linear-probe and kNN accuracy on encoder features,
    and with `finetune` (epochs > 0) the fine-tuned top-1. done: the results of parts finished
    before (a stopped sweep's), which are not run again; finished(results) is called after each
    part (a sweep saves them there, and stops there on a signal)."""
    dataset, seed = config.data.dataset, config.run.seed
    results, finished = dict(done or {}), finished or (lambda results: None)
    model.eval()
    if "heldout_loss" not in results:
        results.update(heldout_metrics(model, heldout.images, precision, dataset, seed))
        finished(results)
    if train.labels is not None and heldout.labels is not None and len(train.labels.unique()) > 1:
        if "knn_acc" not in results:
            device = next(model.parameters()).device
            train_x = extract_features(model, train.images, precision, dataset)
            test_x = extract_features(model, heldout.images, precision, dataset)
            train_y, test_y = train.labels.to(device), heldout.labels.to(device)
            results["linear_probe_acc"] = linear_probe(train_x, train_y, test_x, test_y, seed=seed)
            results["knn_acc"] = knn_accuracy(train_x, train_y, test_x, test_y)
            results["chance_acc"] = 1.0 / len(train.labels.unique())
            finished(results)
        if finetune is not None and finetune.epochs > 0 and "finetune_acc" not in results:
            results["finetune_acc"] = finetune_accuracy(model, precision, config, train, heldout, finetune)
            results["finetune"] = f"{finetune.epochs} epochs, {finetune.precision}"
            finished(results)
    else:
        why = ("its images have no labels (a folder needs two or more first-level subfolders)"
               if train.labels is None or heldout.labels is None else "its training images have one class")
        print(f"[eval] {dataset}: {why}, so no linear probe, kNN or fine-tuning; held-out loss and PSNR only")
        results["accuracy_skipped"] = why
    model.train()
    return results


class Finetune(NamedTuple):
    """--finetune-epochs and --finetune-precision (bf16 or pretrain)."""
    epochs: int
    precision: str

    @classmethod
    def of(cls, command) -> "Finetune":
        return cls(command.finetune_epochs, command.finetune_precision)


@torch.compiler.set_stance("force_eager")
def finetune_accuracy(model: MAE, precision: nvfp4.Precision, config: Config, train: Split, heldout: Split,
                      finetune: Finetune, blr=5e-4) -> float:
    """MAE's fine-tuning evaluation, short (facebookresearch/mae main_finetune.py without mixup,
    cutmix, layer decay or drop path): a copy of the encoder and a linear head on its cls feature
    trained end to end on the labelled training split (AdamW, lr blr x batch / 256, weight decay
    0.05, one warm-up epoch then cosine, random flips); in the AMP dtype with the linear layers
    unquantized (bf16) or in the pretraining precision (pretrain). Returns held-out top-1."""
    device, cfg, dataset = next(model.parameters()).device, model.cfg, config.data.dataset
    net = copy.deepcopy(model).train()
    if finetune.precision == "bf16":
        nvfp4.linear.drop_quantization(net)
        precision = precision.unquantized()
    classes = int(max(train.labels.max(), heldout.labels.max())) + 1
    head = nn.Linear(cfg.embed_dim, classes, device=device)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # as MAE's head
    nn.init.zeros_(head.bias)
    batch = min(config.optim.batch_size, len(train.images))
    steps_per_epoch = len(train.images) // batch  # whole batches: the quantized GEMMs' shape rules hold
    total, warmup = finetune.epochs * steps_per_epoch, steps_per_epoch
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=blr * batch / 256, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * max(0, step - warmup) / max(1, total - warmup))))
    g = torch.Generator().manual_seed(seed_for(config.run.seed, 11))
    for _ in range(finetune.epochs):
        for idx in torch.randperm(len(train.images), generator=g)[:steps_per_epoch * batch].split(batch):
            x = plain_images(train.images[idx], dataset, cfg.img_size)
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x).to(device)
            with precision.autocast():
                loss = F.cross_entropy(head(net.features(x)).float(), train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(heldout.images), batch):
            x = plain_images(heldout.images[start:start + batch], dataset, cfg.img_size).to(device)
            with precision.autocast():
                logits = head(net.features(x))
            correct += (logits.argmax(1).cpu() == heldout.labels[start:start + batch]).sum().item()
    return correct / len(heldout.images)


def run_eval(path: str, cli: Config, explicit, finetune: Finetune) -> dict:
    """--eval CKPT: rebuild the checkpoint's model, evaluate it, write eval_<ckpt>.json beside it."""
    path = find_checkpoint(path, "--eval")
    ckpt, saved = load_checkpoint(path)
    config, _ = resume_config(saved, cli, explicit)  # this device; e.g. another --data-root
    device = torch.device(config.run.device)
    out = path.with_name(f"eval_{path.stem}.json")
    check_writable(out.parent)  # before the evaluation, not after it
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                         f"its features would be NaN; evaluate an earlier checkpoint")
    model, precision = build_model(config, device, config.optim.batch_size)
    load_model_state(model, ckpt["model"], str(path))
    if ckpt.get("unquantized"):  # trained to the end in high precision (--high-precision-from)
        nvfp4.linear.drop_quantization(model)
        precision = precision.unquantized()
    results = evaluate(model, precision, config, load_images(config, train=True), load_images(config, train=False),
                       finetune)
    results["checkpoint"], results["step"] = str(path), ckpt["progress"]["step"]
    try:
        out.write_text(strict_json(results, indent=2))
    except OSError as error:
        raise UsageError(f"cannot write {out} ({error.strerror})") from None
    print(strict_json(results, indent=2))
    print(f"[eval] written to {out}")
    return results


# ============================================================================= comparison

def run_compare(variants: tuple, seeds: tuple, finetune: Finetune) -> dict:
    """Train every (variant, seed) cell (the same config, init, data order and masks for one seed
    across variants) in its folder of one compare root, evaluate it, then write compare/: the
    table with means, stds and paired CIs, results.json, cells.csv and the figures. A rerun with
    the same arguments and --run-name skips the finished cells and resumes an interrupted one."""
    root = compare_root(variants, seeds, finetune)
    results = {}
    for label, config in variants:
        for seed in seeds:
            results.setdefault(label, {})[seed] = run_cell(root, label, config.replace(seed=seed), finetune)
            gc.collect()  # the finished cell's model and optimizer state, before the next measures its peak
        torch._dynamo.reset()  # graphs are kept across the seeds of one variant, not across variants
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    folder = root / "compare"
    folder.mkdir(exist_ok=True)
    report = compare_report(results, variants, seeds)
    write_compare_table(report, folder / "table.md", variants[0].config, seeds)
    write_cells_csv(results, folder / "cells.csv")
    (folder / "results.json").write_text(strict_json(report, indent=2, default=str))
    plot_loss_curves(results, report["reference"], folder / "loss_curves.png")
    save_labelled_recons(results, folder / "recons.png")
    if plot_fp4_stats(results, folder / "fp4_stats.png"):
        print(f"[compare] {folder / 'fp4_stats.png'}: --fp4-stats per layer and operand")
    walls = [c.get("cell_wall_s", 0.0) for cells in results.values() for c in cells.values()]
    print(f"\n{(folder / 'table.md').read_text()}\n[compare] {len(walls)} cells, {sum(walls):.0f} s of cell time "
          f"(cells.csv has each cell's time and compile warm-up)\n[compare] {folder}: table.md, results.json, "
          f"cells.csv, loss_curves.png, recons.png")
    return report


def compare_root(variants: tuple, seeds: tuple, finetune: Finetune) -> Path:
    """The comparison's folder: a new one, or (the same --run-name, the same variants, seeds and
    flags) the one a killed sweep left, to go on with."""
    first = variants[0].config
    plan = {"compare": [{"variant": label, "config": asdict(c)} for label, c in variants], "seeds": list(seeds),
            "finetune": list(finetune)}
    if first.run.run_name and not first.run.overwrite:
        root = Path(first.run.out_dir) / first.run.run_name
        saved = root / "config.json"
        if saved.is_file():
            claim_folder(root)
            saved_plan = json.loads(saved.read_text())
            if "compare" not in saved_plan:
                raise UsageError(f"{root} is a training run's folder, not a comparison's; choose another "
                                 f"--run-name")
            if saved_plan != json.loads(json.dumps(plan)):
                raise UsageError(f"{root} holds another comparison (other variants, seeds or flags); pass "
                                 f"--overwrite to replace it, or another --run-name")
            print(f"[compare] going on with {root}")
            return root
    root = plan_run_dir(first, kind="compare")
    make_run_dir(root, first.run.overwrite)
    (root / "config.json").write_text(json.dumps(plan, indent=2))
    return root


def cell_folder(label: str, seed: int) -> str:
    """'nvfp4:nvfp4-4over6=all', 0 -> 'nvfp4+nvfp4-4over6_all-seed0' (a plain folder name)."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", label.replace(":", "+")) + f"-seed{seed}"


def run_cell(root: Path, label: str, config: Config, finetune: Finetune) -> dict:
    """Train and evaluate one cell, or read a finished cell's cell.json; an interrupted cell goes
    on from its last checkpoint (one without a checkpoint starts again)."""
    run_dir = root / cell_folder(label, config.run.seed)
    done = run_dir / "cell.json"
    if done.is_file():
        print(f"[compare] {label}, seed {config.run.seed}: finished before, skipped ({done})")
        return json.loads(done.read_text())
    print(f"\n===== {label}, seed {config.run.seed} =====")
    start = time.perf_counter()
    config = config.replace(out_dir=str(root), run_name=run_dir.name, overwrite=True)
    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if last is not None:
        ckpt, _ = load_checkpoint(last)
        print(f"[compare] going on from {last}")
        loop = TrainingLoop(config, run_dir=run_dir, ckpt=ckpt)
    else:
        loop = TrainingLoop(config)
    summary = loop.train()
    parts = run_dir / "cell_eval.json"  # the evaluation's finished parts, kept across a stop
    stop = StopRequest("finishing this part of the evaluation, then save it and exit")
    stop.install()

    def finished(results):
        atomic_write_text(parts, strict_json(results))
        if stop.signal is not None:
            raise Interrupted(stop.signal, parts, "the evaluation's finished parts")
    try:
        summary.update(evaluate(loop.train_step.model, loop.train_step.precision, config, loop.train_split,
                                loop.heldout_split, finetune, json.loads(parts.read_text()) if parts.is_file() else {},
                                finished))
    finally:
        stop.restore()
    summary.update(variant=label, seed=config.run.seed, cell_wall_s=time.perf_counter() - start)
    atomic_write_text(done, strict_json(summary, default=str))  # a kill mid-write leaves no half cell.json
    return json.loads(done.read_text())


COMPARE_METRICS = {  # key -> (column, format)
    "final_loss": ("final loss", "{:.4f}"), "heldout_loss": ("held-out loss", "{:.4f}"),
    "psnr_masked": ("PSNR masked (dB)", "{:.2f}"), "linear_probe_acc": ("probe acc", "{:.3f}"),
    "knn_acc": ("kNN acc", "{:.3f}"), "finetune_acc": ("fine-tune acc", "{:.3f}"),
    "img_per_s": ("img/s", "{:.0f}"), "peak_mem_gib": ("peak mem (GiB)", "{:.2f}"),
}


# a cell's first 3 steps (its compile), and its wall time in the process that finished it
CELL_TIMES = ("warmup_s", "cell_wall_s")


def compare_report(results: dict, variants: tuple, seeds: tuple) -> dict:
    """Per variant and metric: mean and std over seeds; per variant against the reference (bf16
    when compared, else the first): the mean of the per-seed differences and its 95% CI (Student
    t over those differences, n - 1 degrees of freedom), and whether the CI excludes 0."""
    from scipy import stats
    reference = next((label for label, _ in variants if label == "bf16"), variants[0].label)
    report = {"reference": reference, "seeds": list(seeds), "variants": {}, "differences": {},
              "cells": {label: {str(seed): {k: v for k, v in cell.items() if not k.endswith("curve")}
                                for seed, cell in cells.items()} for label, cells in results.items()}}
    for label, cells in results.items():
        row, diff = {}, {}
        for key in COMPARE_METRICS:
            values = [cells[seed][key] for seed in seeds if key in cells[seed]]
            if len(values) == len(seeds):
                row[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1
                            else None, "n": len(values)}
            ref_values = [results[reference][seed].get(key) for seed in seeds]
            if label != reference and key in row and None not in ref_values:
                d = np.array(values) - np.array(ref_values)
                ref_mean = float(np.mean(ref_values))  # relative: None where the reference's mean is 0
                entry = {"mean": float(d.mean()), "relative": float(d.mean()) / ref_mean if ref_mean else None,
                         "n": len(d)}
                if len(d) > 1:
                    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
                    entry.update(ci95=[float(d.mean() - half), float(d.mean() + half)],
                                 excludes_zero=bool(abs(d.mean()) > half))
                diff[key] = entry
        report["variants"][label] = row
        if label != reference:
            report["differences"][label] = diff
    report["closest"] = closest_variants(report["differences"])
    return report


def closest_variants(differences: dict, key: str = "final_loss") -> dict:
    """Per precision with a variant other than the reference: the variant whose mean paired
    difference in `key` is smallest in size, with that difference (CI and whether it excludes 0)."""
    closest = {}
    for label, diff in differences.items():
        best = closest.get(label.split(":")[0])
        if key in diff and (best is None or abs(diff[key]["mean"]) < abs(best[key]["mean"])):
            closest[label.split(":")[0]] = {"variant": label, key: diff[key]}
    return closest


def percent(relative: Optional[float]) -> str:
    return "n/a %: the reference is 0" if relative is None else f"{relative:+.1%}"


def write_compare_table(report: dict, path: Path, config: Config, seeds: tuple):
    """Two markdown tables: mean +- std per variant; the paired differences to the reference."""
    keys = [k for k in COMPARE_METRICS if any(k in row for row in report["variants"].values())]
    cell = lambda stat, fmt: "n/a" if stat is None else fmt.format(stat["mean"]) + (
        f" ± {fmt.format(stat['std'])}" if stat.get("std") is not None else "")
    lines = ["| variant | " + " | ".join(COMPARE_METRICS[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, row in report["variants"].items():
        lines.append(f"| {label} | " + " | ".join(cell(row.get(k), COMPARE_METRICS[k][1]) for k in keys) + " |")
    ref = report["reference"]
    lines += ["", f"Paired differences to {ref} (variant - {ref}, mean over seeds [95% CI]; * where the CI "
                  f"excludes 0):", "", "| variant | " + " | ".join(COMPARE_METRICS[k][0] for k in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for label, diff in report["differences"].items():
        out = []
        for k in keys:
            d, fmt = diff.get(k), COMPARE_METRICS[k][1].replace("{:", "{:+")
            if d is None:
                out.append("n/a")
            elif "ci95" not in d:
                out.append(f"{fmt.format(d['mean'])} ({percent(d['relative'])}; 1 seed)")
            else:
                lo, hi = (fmt.format(v) for v in d["ci95"])
                out.append(f"{fmt.format(d['mean'])} ({percent(d['relative'])}) [{lo}, {hi}]{' *' if d['excludes_zero'] else ''}")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    for precision, best in report["closest"].items():
        d = best["final_loss"]
        if "ci95" in d:
            ci = " [{:+.4f}, {:+.4f}]".format(*d["ci95"])
            verdict = "significant (the CI excludes 0)" if d["excludes_zero"] else "not significant (the CI includes 0)"
        else:
            ci, verdict = "", "1 seed, no CI"
        lines.append(f"\nClosest {precision} variant to {ref} in final loss: {best['variant']}, "
                     f"{d['mean']:+.4f} ({percent(d['relative'])}){ci}: {verdict}.")
    d, m, o = config.data, config.model, config.optim
    lines.append(f"\n{d.dataset}, model {m.preset}, {m.img_size}px/patch {m.patch_size}, {o.epochs} epochs, batch "
                 f"{o.batch_size}, seeds {', '.join(map(str, seeds))}; loss = mean masked MSE of the last epoch; "
                 f"std over seeds (n - 1).")
    path.write_text("\n".join(lines) + "\n")


def write_cells_csv(results: dict, path: Path):
    """One row per (variant, seed) with every metric: the numbers behind the table."""
    import csv
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", *COMPARE_METRICS, *CELL_TIMES, "backend"])
        for label, cells in results.items():
            for seed, c in cells.items():
                writer.writerow([label, seed, *(c.get(k, "") for k in (*COMPARE_METRICS, *CELL_TIMES)),
                                 c.get("backend", "")])


def mean_curves(cells: dict) -> tuple:
    """(steps, mean, std) of the cells' loss curves over seeds (epoch means for runs shorter
    than two --log-every intervals); the seeds share their steps."""
    key = "curve" if all(len(c["curve"]) >= 2 for c in cells.values()) else "epoch_curve"
    curves = [np.array(c[key], dtype=float) for c in cells.values()]
    length = min(len(c) for c in curves)
    losses = np.stack([c[:length, 1] for c in curves])
    return curves[0][:length, 0], losses, key


def plot_loss_curves(results: dict, reference: str, path: Path):
    """Left: each variant's loss over steps, mean over seeds with a +-std band. Right: the
    relative gap to the reference, per seed then averaged, with its band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(3, len(results))  # of the legend under both panels
    legend_rows = math.ceil(len(results) / columns)
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.3 * legend_rows))
    ref_steps, ref_losses, key = mean_curves(results[reference])
    for label, cells in results.items():
        steps, losses, _ = mean_curves(cells)
        mean, std = losses.mean(0), losses.std(0, ddof=1) if len(losses) > 1 else np.zeros(losses.shape[1])
        (line,) = ax.plot(steps, mean, label=label, marker="o" if key == "epoch_curve" else None)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if label == reference:  # its gap is the zero line
            continue
        n = min(len(steps), len(ref_steps))
        rel = 100 * (losses[:, :n] - ref_losses[:, :n]) / ref_losses[:, :n]
        rel_std = rel.std(0, ddof=1) if len(rel) > 1 else np.zeros(n)
        gap_ax.plot(steps[:n], rel.mean(0), color=line.get_color(), label=label)
        gap_ax.fill_between(steps[:n], rel.mean(0) - rel_std, rel.mean(0) + rel_std, color=line.get_color(), alpha=0.2)
    seeds = len(next(iter(results.values())))
    ax.set(xlabel="step", ylabel=f"train loss (masked MSE{', epoch mean' if key == 'epoch_curve' else ''})",
           yscale="log", title=f"MAE pretraining loss, mean ± std over {seeds} seed{'s' * (seeds > 1)}")
    gap_ax.axhline(0, color="black", linewidth=0.8)
    gap_ax.set(xlabel="step", ylabel=f"loss gap to {reference} (%)", title=f"relative gap to {reference}, paired by seed")
    # one legend under both panels (the variant strings are long; inside, they hide the curves)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=columns, frameon=False)
    fig.tight_layout(rect=(0, 0.055 * legend_rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_labelled_recons(results: dict, path: Path, scale: int = 3):
    """The first seed's final reconstruction grid of each variant, one below the other, each
    upscaled (nearest, so 32 px images stay sharp) under a strip with the variant's name."""
    from PIL import ImageDraw
    grids = []
    for label, cells in results.items():
        recon = next((c["recon"] for c in cells.values() if Path(c.get("recon", "")).is_file()), None)
        if recon is None:  # a cell.json written without its grid (before a grid was made on resume)
            print(f"[compare] {label}: no final reconstruction grid in its cells; left out of {path.name}")
            continue
        grid = Image.open(recon).convert("RGB")
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        strip = Image.new("RGB", (grid.width, 16), "white")
        ImageDraw.Draw(strip).text((4, 2), f"{label} (rows: original | visible | reconstruction)", fill="black")
        grids += [strip, grid]
    if not grids:
        return
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    top = 0
    for g in grids:
        canvas.paste(g, (0, top))
        top += g.height
    canvas.save(path)


def plot_fp4_stats(results: dict, path: Path) -> bool:
    """Heat maps of the --fp4-stats summary (layer x operand: share of nonzeros flushed to zero,
    relative error) for each variant that has one; False if none has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = {label: next(iter(cells.values()))["fp4_stats"] for label, cells in results.items()
             if "fp4_stats" in next(iter(cells.values()))}
    if not stats:
        return False
    operands = ["X", "W", "dY"]
    fig, axes = plt.subplots(len(stats), 2, figsize=(10, 0.25 * max(len(s) for s in stats.values()) / 3 * len(stats) + 2),
                             squeeze=False)
    for row, (label, summary) in zip(axes, stats.items()):
        layers = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in summary))
        for ax, (metric, title) in zip(row, (("flushed_to_zero", "nonzeros flushed to zero"),
                                             ("rel_error", "relative error"))):
            grid = np.array([[summary.get(f"{layer}.{op}", {}).get(metric, np.nan) for op in operands]
                             for layer in layers])
            image = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set(xticks=range(3), xticklabels=operands, yticks=range(len(layers)), title=f"{label}: {title}")
            ax.set_yticklabels(layers, fontsize=6)
            fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ============================================================================= benchmark

def flops_per_image(cfg: MAEConfig) -> float:
    """Training FLOPs per image: 3 x forward (forward + backward), matmuls and attention only."""
    p2c, te, td = cfg.patch_size ** 2 * 3, cfg.num_visible + 1, cfg.num_patches + 1
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    enc = cfg.depth * (2 * te * (4 * d * d + 2 * d * int(d * cfg.mlp_ratio)) + 4 * te * te * d)
    dec = cfg.decoder_depth * (2 * td * (4 * dd * dd + 2 * dd * int(dd * cfg.decoder_mlp_ratio)) + 4 * td * td * dd)
    return 3 * (enc + dec + 2 * cfg.num_visible * p2c * d + 2 * te * d * dd + 2 * td * dd * p2c)


def gpu_mark() -> torch.cuda.Event:
    """A timing event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def measure_bf16_peak(device) -> float:
    """Dense bf16 matmul rate of this GPU (TFLOP/s), the MFU denominator."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = gpu_mark()
    for _ in range(10):
        a @ b
    end = gpu_mark()
    torch.cuda.synchronize(device)
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


def benchmark_batches(config: Config, synthetic: bool):
    """(endless batches, the loader or None): one fixed batch on the device, or the real loader."""
    device, o, m = torch.device(config.run.device), config.optim, config.model
    if synthetic:
        g = torch.Generator().manual_seed(config.run.seed)
        batch = (torch.randn(o.batch_size, 3, m.img_size, m.img_size, generator=g).to(device),
                 torch.rand(o.batch_size, m.num_patches, generator=g).to(device))
        return itertools.repeat(batch), None
    loader = make_loader(config, load_images(config, train=True))
    return (b for epoch in itertools.count() for b in loader.epoch(epoch)), loader


def time_steps(train_step: TrainStep, batches, loader, steps: int, first: int, lr: float) -> dict:
    """Run `steps` steps from step number `first`: wall and GPU ms, and the GPU time the data took
    (tensor loader: from the end of a step to the batch's last kernel, host waits included;
    torchvision: host waits on the workers, while the GPU runs dry)."""
    tensor_loader = isinstance(loader, TensorLoader)
    if loader is not None and not tensor_loader:
        loader.wait_s = 0.0
    data_spans = []  # (before, after) each batch's loader work, on the training stream
    start, t0 = gpu_mark(), time.perf_counter()
    for n in range(steps):
        before = gpu_mark() if tensor_loader else None
        batch = next(batches)
        if tensor_loader:
            data_spans.append((before, gpu_mark()))
        train_step(*batch, lr, first + n)
    end = gpu_mark()
    torch.cuda.synchronize(train_step.device)
    data_ms = (sum(b.elapsed_time(a) for b, a in data_spans) if tensor_loader else
               loader.wait_s * 1e3 if loader is not None else 0.0)
    return {"wall_ms": (time.perf_counter() - t0) * 1e3, "gpu_ms": start.elapsed_time(end), "data_ms": data_ms}


@torch.compiler.set_stance("force_eager")
def memory_parts(train_step: TrainStep, batch) -> dict:
    """GiB of the static part of a step's memory (parameters, their gradients, optimizer state)
    and of what the linear layers save for backward in one forward pass of `batch`, by operand
    (x: the inputs' copies, w: the weights'); an eager pass, where the layers count it (a
    compiled step can save less: its partitioner may recompute a cheap producer, such as a
    LayerNorm or a cast, in backward rather than keep its output)."""
    gib = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 2 ** 30
    params = list(train_step.model.parameters())
    state = [v for s in train_step.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    devices = [train_step.device] if train_step.device.type == "cuda" else []
    parts = {"params_gib": gib(params), "grads_gib": gib(p for p in params if p.requires_grad),
             "optimizer_gib": gib(state)}
    try:
        with torch.random.fork_rng(devices=devices), nvfp4.linear.count_saved_bytes() as saved:
            with train_step.precision.autocast():
                train_step.model(*batch)  # the graph (and what it saved) is freed on return
    except torch.OutOfMemoryError:  # beside a captured step's pool, at the largest batches
        torch.cuda.empty_cache()
        return {"static_mem_gib": sum(parts.values()), **parts, "saved_x_gib": None, "saved_w_gib": None}
    return {"static_mem_gib": sum(parts.values()), **parts,
            "saved_x_gib": saved["x"] / 2 ** 30, "saved_w_gib": saved["w"] / 2 ** 30}


def run_benchmark(config: Config, steps: int, synthetic: bool, profile: bool = False, warmup_steps=20,
                  profile_steps=20) -> dict:
    """--benchmark N: warm up (compile), time N steps; img/s, step ms, peak memory, data wait, MFU;
    with profile, where 20 more steps' GPU time goes (workbench.profile)."""
    device, o, m = torch.device(config.run.device), config.optim, config.model
    if device.type != "cuda":
        raise UsageError("--benchmark measures GPU time; run it on a CUDA device")
    check_writable(Path(config.run.out_dir))
    seed_everything(config.run.seed)
    peak_tflops = measure_bf16_peak(device)  # before the step's memory: it fits beside any batch
    train_step = TrainStep(config, device)
    batches, loader = benchmark_batches(config, synthetic)
    for line in precision_lines(config, train_step):
        print(f"[precision] {line}")
    # The peak is reset after the first two steps (the compile, with its autotuning's buffers) and
    # covers the rest of the warm-up: a CUDA-graphed step allocates its activations once, in its
    # capture (the third step), and its replays take them from the graph's pool unseen.
    t0 = time.perf_counter()
    for n in range(warmup_steps):
        if n == 2:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        train_step(*next(batches), o.peak_lr, n)
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    if config.run.compile:
        stop_compile_workers()
    t = time_steps(train_step, batches, loader, steps, warmup_steps, o.peak_lr)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    memory = memory_parts(train_step, next(batches))
    flops = flops_per_image(m)
    img_s = o.batch_size * steps / (t["wall_ms"] / 1e3)
    result = {"precision": config.precision.name, "backend": train_step.precision.backend_name,
              "mode": "model only (synthetic batch)" if synthetic else f"end to end ({config.data.loader} loader)",
              "batch": o.batch_size, "img_size": m.img_size, "patch_size": m.patch_size, "model": m.preset,
              "compile": config.run.compile, "img_per_s": img_s, "step_ms": t["wall_ms"] / steps,
              "gpu_step_ms": t["gpu_ms"] / steps, "peak_mem_gib": peak, **memory,
              "activation_mem_gib": peak - memory["static_mem_gib"],
              "data_wait_pct": 100 * t["data_ms"] / t["gpu_ms"], "warmup_s": warmup_s, "gflop_per_img": flops / 1e9,
              "bf16_peak_tflops": peak_tflops, "mfu_pct": 100 * flops * img_s / (peak_tflops * 1e12)}
    print(f"[benchmark] FLOPs/img = 3 x (enc: depth x (2 T_e (4 D^2 + 2 D H) + 4 T_e^2 D) + dec: same with "
          f"T_d, D_d, H_d + embed/pred matmuls), T_e = visible + 1, T_d = patches + 1 -> {flops / 1e9:.3f} GFLOP")
    for key, value in result.items():
        print(f"[benchmark] {key:18s} {value:.3f}" if isinstance(value, float) else f"[benchmark] {key:18s} {value}")
    r = result
    print(f"[benchmark] memory: peak {peak:.3f} GiB = static {r['static_mem_gib']:.3f} (parameters "
          f"{r['params_gib']:.3f}, gradients {r['grads_gib']:.3f}, optimizer state {r['optimizer_gib']:.3f}) + "
          f"activations {r['activation_mem_gib']:.3f}; " + (
              f"the linear layers save {r['saved_x_gib']:.3f} GiB of x copies and {r['saved_w_gib']:.3f} GiB of w "
              f"copies for backward" if r["saved_x_gib"] is not None else
              "what the linear layers save was not counted: an eager pass does not fit beside the captured step"))
    out = Path(config.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # check_writable ran before the warm-up
    if profile:
        result.update(profile_benchmark(config, train_step, batches, warmup_steps + steps, profile_steps))
    with open(out / "benchmarks.jsonl", "a") as f:
        f.write(strict_json(result) + "\n")
    return result


def profile_benchmark(config: Config, train_step: TrainStep, batches, first: int, steps: int) -> dict:
    """--profile: `steps` more steps under torch.profiler; prints CUDA time per step by kernel
    group and the top kernels, writes the Chrome trace to the out dir; the summary's numbers."""
    from workbench.profile import profile_steps, report_lines
    o, m = config.optim, config.model
    trace = Path(config.run.out_dir) / f"profile_{config.precision.name}_{m.preset}_b{o.batch_size}.json"
    summary = profile_steps(lambda: train_step(*next(batches), o.peak_lr, first), steps, trace)
    for line in report_lines(summary, steps):
        print(f"[profile] {line}")
    print(f"[profile] Chrome trace: {trace}")
    return {"profile_ms": summary["groups_ms"], "profile_top": summary["top"]}


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
            return run_eval(command.eval, config, command.explicit, Finetune.of(command))
        if config.run.compile:
            start_compile_workers()
        if command.mode == "benchmark":
            return run_benchmark(config, command.benchmark, command.benchmark_synthetic, command.profile)
        if command.mode == "compare":
            return run_compare(command.variants, command.sweep_seeds, Finetune.of(command))
        run_dir, ckpt, changes = None, None, []
        if command.mode == "resume":
            path = find_checkpoint(command.resume, "--resume")
            ckpt, saved = load_checkpoint(path)
            config, changes = resume_config(saved, config, command.explicit)
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
