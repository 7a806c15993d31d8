#!/usr/bin/env python
"""Pretrain a ViT Masked Autoencoder (He et al. 2021) on CIFAR with its linear layers in
NVFP4, FP8 or BF16, and see what 4-bit training costs: losses, pictures, speed, memory.

    python asmae_minimal.py --dataset cifar100 --epochs 150 --batch-size 128 --mask-ratio 0.6 --randaugment
    python asmae_minimal.py --precision nvfp4 --epochs 50
    python asmae_minimal.py --compare bf16,fp8,nvfp4 --epochs 20

Sections follow the data: arguments -> data -> model -> quantization -> train step -> outputs,
then evaluation, comparison, benchmark and main.
"""
import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

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
from nvfp4 import te_backend
from nvfp4.guards import check_mask, gemm_shape_error, require_contiguous

try:
    import augment_kernel  # Triton: the GPU loader's augmentation in one kernel
except ImportError:
    augment_kernel = None

# ----------------------------------------------------------------------------- arguments

MODEL_PRESETS = {  # encoder dim x depth (heads), decoder dim x depth (heads), MLP ratios
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
                 decoder_num_heads=4, mlp_ratio=4.0, decoder_mlp_ratio=4.0),
    "small": dict(embed_dim=384, depth=6, num_heads=6, decoder_embed_dim=192, decoder_depth=4,
                  decoder_num_heads=6, mlp_ratio=4.0, decoder_mlp_ratio=2.0),  # the seed script's model
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, mlp_ratio=4.0, decoder_mlp_ratio=4.0),  # MAE ViT-B
}
PRECISIONS = ("fp32", "bf16", "fp8", "nvfp4")
DEFAULTS = dict(dataset="cifar10", data_root="./data", loader="tensor", num_workers=min(8, os.cpu_count() or 1),
                model="small", img_size=32, patch_size=4, mask_ratio=0.75, backend="auto",
                keep_high_precision="patch_embed,decoder_pred", epochs=50, blr=1.5e-4, warmup_epochs=5,
                weight_decay=0.05, seed=0, device="auto", out_dir="runs", log_every=50, save_every=10,
                keep_last=3, max_bad_steps=20, wandb_project="nvfp4-mae")
# A resumed run must rebuild the same model on the same data.
RESUME_CONFLICTS = ("model", "img_size", "patch_size", "precision", "dataset", "norm_pix_loss")


class UsageError(Exception):
    """A bad input: main() prints it on one line and exits with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, but not None/False ones
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    presets = "; ".join(f"{k}: encoder {v['embed_dim']}x{v['depth']} ({v['num_heads']} heads), decoder "
                        f"{v['decoder_embed_dim']}x{v['decoder_depth']} ({v['decoder_num_heads']} heads)"
                        for k, v in MODEL_PRESETS.items())
    p = ArgumentParser(prog="asmae_minimal.py", description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter,
                       argument_default=None if with_defaults else argparse.SUPPRESS)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "fake", "folder"],
                   help="fake: 50,000 random-noise 32x32 labelled images for smoke runs and benchmarks "
                        "(like --dummy of PyTorch's ImageNet example); folder: every image under --data-root")
    g.add_argument("--data-root", help="where CIFAR is downloaded to, or the image folder")
    g.add_argument("--loader", choices=["tensor", "torchvision"],
                   help="tensor: uint8 dataset on the training device, per-sample augmentation there; "
                        "torchvision: PIL transforms in a DataLoader (the seed script's pipeline)")
    g.add_argument("--num-workers", type=int, help="DataLoader workers of --loader torchvision")
    g.add_argument("--randaugment", action="store_true", help="add RandAugment(2 ops, magnitude 9)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(MODEL_PRESETS), help=f"size preset ({presets})")
    g.add_argument("--img-size", type=int, help="input resolution (CIFAR is 32; 224 upsamples as the seed did)")
    g.add_argument("--patch-size", type=int, help="ViT patch size")
    g.add_argument("--mask-ratio", type=float, help="fraction of patches masked")
    g.add_argument("--norm-pix-loss", action="store_true", help="MSE on per-patch normalized pixels")
    g = p.add_argument_group("precision")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="GEMM precision of the linear layers (default: bf16 with AMP, else fp32)")
    g.add_argument("--backend", choices=["auto", "te", "emulated"],
                   help="auto: Transformer Engine where it imports and the GPU runs the recipe, else emulation")
    g.add_argument("--no-rht", action="store_true", help="NVFP4: no Random Hadamard Transform (TE disable_rht)")
    g.add_argument("--no-stochastic-rounding", action="store_true",
                   help="NVFP4: round gradients to nearest (TE disable_stochastic_rounding)")
    g.add_argument("--no-2d-weights", action="store_true",
                   help="NVFP4: 1x16 blocks for weights too (TE disable_2d_quantization)")
    g.add_argument("--keep-high-precision", metavar="PATTERNS",
                   help="comma-separated layer-name patterns kept in BF16 under fp8/nvfp4 ('' keeps none); "
                        "the NVFP4 recipe keeps the most sensitive first and last layers in high precision")
    g.add_argument("--fp4-stats", action="store_true",
                   help="log per-layer NVFP4 diagnostics (flushed-to-zero, at-block-max, scale range, error)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int, help="global batch size (default: 256 on GPU, 32 on CPU)")
    g.add_argument("--blr", type=float, help="base learning rate: lr = blr x batch size / 256")
    g.add_argument("--lr", type=float, help="absolute learning rate (overrides --blr)")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup, then cosine decay to 0 (per step)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--seed", type=int, help="seeds data order, augmentation, masking and weights")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto (cuda if available), cpu, cuda or cuda:N")
    amp = g.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_const", const=True,
                     help="autocast activations to bf16 (fp16 + GradScaler where bf16 is missing); default on GPU")
    amp.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="run activations in fp32")
    comp = g.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_const", const=True,
                      help="torch.compile the model and augment.py's ops (default on GPU)")
    comp.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="run eagerly")
    g.add_argument("--benchmark", type=int, metavar="N", help="time N steps after warm-up and exit")
    g.add_argument("--benchmark-synthetic", action="store_true",
                   help="with --benchmark: a fixed batch on the device, model and optimizer only")
    g = p.add_argument_group("outputs")
    g.add_argument("--out-dir", help="runs go to OUT_DIR/RUN_NAME/, the latest recon grid to OUT_DIR/recons/")
    g.add_argument("--run-name", help="default: dataset-model-precision-timestamp")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --run-name folder")
    g.add_argument("--log-every", type=int, help="steps between metrics lines")
    g.add_argument("--save-every", type=int, help="epochs between checkpoints (and one at the end)")
    g.add_argument("--keep-last", type=int, help="checkpoints kept")
    g.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file or a run folder")
    g.add_argument("--max-bad-steps", type=int, help="consecutive non-finite steps that stop the run")
    g.add_argument("--use-wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", help="W&B project")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", metavar="CKPT", help="evaluate a checkpoint (held-out loss, PSNR, linear probe, kNN) and exit")
    g.add_argument("--compare", metavar="PRECISIONS",
                   help="train the same config in each of these precisions (e.g. bf16,fp8,nvfp4) and write a report")
    if with_defaults:
        p.set_defaults(**DEFAULTS)
    return p


def resolve_args(argv=None):
    """Parse, fill the per-device defaults, validate. Raises UsageError on bad input."""
    args = build_parser().parse_args(argv)
    args.explicit = sorted(vars(build_parser(with_defaults=False).parse_args(argv)))
    args.device = str(resolve_device(args.device))
    on_gpu = args.device.startswith("cuda")
    if args.precision == "bf16" and args.amp is False:
        raise UsageError("--precision bf16 runs under AMP; drop --no-amp or use --precision fp32")
    if args.precision == "fp32" and args.amp:
        raise UsageError("--precision fp32 runs without AMP; drop --amp or use --precision bf16")
    if args.amp is None:
        args.amp = args.precision == "bf16" or (on_gpu and args.precision != "fp32")
    args.precision = args.precision or ("bf16" if args.amp else "fp32")
    args.compile = on_gpu if args.compile is None else args.compile
    args.batch_size = args.batch_size or (256 if on_gpu else 32)
    validate(args)
    args.lr = args.lr or args.blr * args.batch_size / 256  # MAE's linear scaling rule (global batch)
    return args


def validate(args):
    checks = [
        (args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}"),
        (0 < args.mask_ratio < 1, f"--mask-ratio must be in (0, 1), got {args.mask_ratio}"),
        (args.patch_size > 0 and args.img_size > 0, "--img-size and --patch-size must be positive"),
        (args.patch_size <= 0 or args.img_size % args.patch_size == 0,  # positivity is reported above
         f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}"),
        (args.lr is None or args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.blr > 0, f"--blr must be positive, got {args.blr}"),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}"),
        (args.log_every > 0 and args.save_every > 0 and args.keep_last > 0 and args.max_bad_steps > 0,
         "--log-every, --save-every, --keep-last and --max-bad-steps must be positive"),
        (args.benchmark is None or args.benchmark > 0, f"--benchmark must be positive, got {args.benchmark}"),
        (not args.benchmark_synthetic or args.benchmark, "--benchmark-synthetic needs --benchmark N"),
        (not args.fp4_stats or args.precision == "nvfp4" or args.compare, "--fp4-stats needs --precision nvfp4"),
        (not (args.no_rht or args.no_stochastic_rounding or args.no_2d_weights) or args.precision == "nvfp4"
         or args.compare, "--no-rht, --no-stochastic-rounding and --no-2d-weights apply to --precision nvfp4"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    num_patches = (args.img_size // args.patch_size) ** 2
    keep = int(num_patches * (1 - args.mask_ratio))
    if not 0 < keep < num_patches:
        raise UsageError(f"--mask-ratio {args.mask_ratio} leaves {keep} of {num_patches} patches visible")
    if args.compare:
        unknown = [p for p in args.compare.split(",") if p not in PRECISIONS]
        if unknown or not args.compare.strip(","):
            raise UsageError(f"--compare takes a comma-separated list of {', '.join(PRECISIONS)}, got {args.compare!r}")
    if args.use_wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError("--use-wandb: wandb is not installed (pip install wandb), or drop --use-wandb")


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
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
    return device


# ----------------------------------------------------------------------------- data

CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def dataset_stats(name):
    return CIFAR_STATS.get(name, IMAGENET_STATS)


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


def folder_images(root: str, train: bool, size: int):
    """Every readable image under root (recursive), resized (shorter side) and center-cropped
    to size. Every 10th file is held out. Labels come from first-level subfolders when there are
    at least two of them; unreadable files are skipped and counted."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise UsageError(f"--data-root {root} is not a folder of images")
    files = sorted(f for f in root_path.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise UsageError(f"--data-root {root} holds no images ({', '.join(IMG_EXTENSIONS)})")
    files = [f for i, f in enumerate(files) if (i % 10 == 9) != train] if len(files) >= 10 else files
    classes = sorted({f.relative_to(root_path).parts[0] for f in files if len(f.relative_to(root_path).parts) > 1})
    resize = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    images, labels, skipped = [], [], 0
    for f in files:
        try:
            with Image.open(f) as img:
                images.append(torch.from_numpy(np.array(resize(img.convert("RGB")))).permute(2, 0, 1))
            labels.append(classes.index(f.relative_to(root_path).parts[0]) if len(classes) >= 2 else 0)
        except (OSError, UnidentifiedImageError, ValueError):
            skipped += 1
    if not images:
        raise UsageError(f"--data-root {root}: none of the {len(files)} image files could be read")
    if skipped:
        print(f"[data] skipped {skipped} unreadable file(s) under {root}")
    return torch.stack(images), (torch.tensor(labels) if len(classes) >= 2 else None)


def load_images(args, train: bool):
    """(uint8 images [N, 3, H, W], int64 labels or None, a torchvision dataset yielding PIL images)."""
    if args.dataset in CIFAR_STATS:
        ds = open_cifar(args.dataset, args.data_root, train)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds
    if args.dataset == "fake":
        images, labels = fake_images(train, args.seed)
    else:
        images, labels = folder_images(args.data_root, train, args.img_size)
    return images, labels, TensorImages(images, labels)


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
    steps. On a side stream, concurrent with the step, they were no faster in the same process
    and cost 0.2-0.5 ms a step from one process to the next."""

    def __init__(self, images, args, rank=0, world=1):
        self.device = torch.device(args.device)
        on_gpu = self.device.type == "cuda"
        fits = on_gpu and images.numel() < 0.25 * torch.cuda.get_device_properties(self.device).total_memory
        self.images = images.to(self.device) if fits else (images.pin_memory() if on_gpu else images)
        self.batch, self.local = args.batch_size, args.batch_size // world
        self.rank, self.seed, self.size = rank, args.seed, args.img_size
        self.randaugment = args.randaugment
        self.kernel = on_gpu and augment_kernel is not None
        # augment.py's ops (after the GPU kernel: RandAugment); compiled, their ~400 small kernels
        # fuse into a few (host-bound otherwise)
        torch_ops = self._rand_augment if self.kernel else self._augment
        self.augment_fn = torch.compile(torch_ops, dynamic=False) if args.compile else torch_ops
        self.num_patches = (args.img_size // args.patch_size) ** 2
        mean, std = dataset_stats(args.dataset)
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


class TorchvisionLoader:
    """The seed script's pipeline: PIL transforms in DataLoader workers, same shard and noise rules."""

    def __init__(self, dataset, args, rank=0, world=1):
        mean, std = dataset_stats(args.dataset)
        tfm = [transforms.RandomResizedCrop(args.img_size, scale=augment.CROP_SCALE), transforms.RandomHorizontalFlip(),
               transforms.ColorJitter(*augment.JITTER)]
        tfm += [transforms.RandAugment()] if args.randaugment else []
        dataset.transform = transforms.Compose(tfm + [transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.dataset, self.args, self.rank, self.world = dataset, args, rank, world
        self.batch, self.local = args.batch_size, args.batch_size // world
        self.num_patches = (args.img_size // args.patch_size) ** 2
        self.device = torch.device(args.device)
        self.wait_s = 0.0  # host time blocked on the workers (the GPU has nothing queued then)

    def __len__(self):
        return len(self.dataset) // self.batch

    def epoch(self, epoch: int, start: int = 0):
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed_for(self.args.seed, epoch)))
        order = perm[:len(self) * self.batch].view(len(self), self.world, self.local)[:, self.rank].flatten().tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.local, sampler=order, num_workers=self.args.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(seed_for(self.args.seed, epoch, 1 << 20, self.rank)))
        part = slice(self.rank * self.local, (self.rank + 1) * self.local)
        batches = iter(loader)
        for b in range(len(self)):
            t0 = time.perf_counter()
            imgs, _ = next(batches)
            self.wait_s += time.perf_counter() - t0
            if b < start:
                continue
            noise = masking_noise(self.args.seed, epoch, b, self.batch, self.num_patches, part, self.device)
            yield imgs.to(self.device, non_blocking=True), noise


def plain_batches(images, args, count: int):
    """The first `count` images resized to --img-size and normalized, no augmentation."""
    mean, std = dataset_stats(args.dataset)
    x = images[:count].float() / 255
    if x.shape[-1] != args.img_size:
        x = F.interpolate(x, size=(args.img_size, args.img_size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- model

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


@dataclass
class MAEConfig:
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 192
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    decoder_mlp_ratio: float = 2.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self):
        return int(self.num_patches * (1 - self.mask_ratio))


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


def model_config(args) -> MAEConfig:
    return MAEConfig(img_size=args.img_size, patch_size=args.patch_size, mask_ratio=args.mask_ratio,
                     norm_pix_loss=args.norm_pix_loss, **MODEL_PRESETS[args.model])


def flops_per_image(cfg: MAEConfig) -> float:
    """Training FLOPs per image: 3 x forward (forward + backward), matmuls and attention only."""
    p2c, te, td = cfg.patch_size ** 2 * 3, cfg.num_visible + 1, cfg.num_patches + 1
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    enc = cfg.depth * (2 * te * (4 * d * d + 2 * d * int(d * cfg.mlp_ratio)) + 4 * te * te * d)
    dec = cfg.decoder_depth * (2 * td * (4 * dd * dd + 2 * dd * int(dd * cfg.decoder_mlp_ratio)) + 4 * td * td * dd)
    return 3 * (enc + dec + 2 * cfg.num_visible * p2c * d + 2 * te * d * dd + 2 * td * dd * p2c)


# ----------------------------------------------------------------------------- quantization

def build_model(args, device):
    """The MAE with its linear layers per --precision/--backend; returns (model, backend, recipe, log lines)."""
    recipe = None
    if args.precision == "nvfp4":
        recipe = nvfp4.NVFP4Recipe(disable_rht=args.no_rht, disable_stochastic_rounding=args.no_stochastic_rounding,
                                   disable_2d_quantization=args.no_2d_weights)
    elif args.precision == "fp8":
        recipe = nvfp4.FP8Recipe()
    try:
        backend, backend_line = te_backend.select_backend(args.backend, args.precision, device)
    except te_backend.BackendError as error:
        raise UsageError(str(error)) from None
    keep = [p.strip() for p in args.keep_high_precision.split(",") if p.strip()]
    layers = nvfp4.LayerFactory(recipe, keep_high_precision=keep, backend=backend)
    cfg = model_config(args)
    with torch.device(device):
        model = MAE(cfg, layers)
    lines = [backend_line]
    if recipe is not None:
        quantized = [name for name, *_, q in model.gemms if q]
        kept = [name for name, *_, q in model.gemms if not q]
        lines.append(f"{args.precision}: {len(quantized)} of {len(model.gemms)} GEMM layers quantized "
                     f"({compact_names(quantized)}); high precision: {compact_names(kept) or 'none'}")
        if args.precision == "nvfp4":
            lines.append(f"NVFP4 recipe: RHT {'off' if args.no_rht else 'on'} (wgrad operands), stochastic rounding "
                         f"{'off' if args.no_stochastic_rounding else 'on'} (gradients), weights in "
                         f"{'1x16 blocks' if args.no_2d_weights else '16x16 tiles'}")
        check_gemm_shapes(model, args, args.batch_size // max(1, world_size()))
    return model, backend, recipe, lines


def compact_names(names):
    """'blocks.0.mlp.fc1', 'blocks.1.mlp.fc1' -> 'blocks.*.mlp.fc1' (order kept)."""
    out = []
    for name in names:
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        if pattern not in out:
            out.append(pattern)
    return ", ".join(out)


def check_gemm_shapes(model, args, batch_per_rank: int):
    """Every quantized GEMM meets TE's multiples for this model and batch, else a message naming it."""
    cfg = model.cfg
    for name, k, n, quantized in model.gemms:
        if not quantized:
            continue
        tokens = cfg.num_visible if name == "patch_embed" else (
            cfg.num_visible + 1 if name.startswith(("blocks.", "decoder_embed")) else cfg.num_patches + 1)
        error = gemm_shape_error(args.precision, batch_per_rank * tokens, k, n)
        if error:
            raise UsageError(f"layer {name}: {error}; change --batch-size, the model, or keep the layer in high precision "
                             f"with --keep-high-precision")


# ----------------------------------------------------------------------------- train step

def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed():
    """(rank, world) from torchrun's environment; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (README: multi-GPU)
    use_gpu = torch.cuda.is_available() and os.environ.get("ASMAE_FORCE_GLOO") != "1"
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def amp_context(args):
    if not args.amp:
        return nullcontext()
    device_type = torch.device(args.device).type
    dtype = torch.bfloat16 if device_type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)  # no cached casts in a CUDA graph


def make_optimizer(model, args, capturable: bool = False):
    """AdamW (0.9, 0.95), fused (its found_inf lets the loss guard skip a step on the device);
    no weight decay on biases and norms (1-D parameters). capturable: can run in a CUDA graph."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True, capturable=capturable)


def lr_at(step: int, steps_per_epoch: int, args) -> float:
    """Per-iteration linear warmup, then half-cycle cosine to 0 (MAE's schedule)."""
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-9)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def compile_model(model: MAE, model_graphs: bool):
    """Regional compilation, in place (PyTorch's recipe for models of repeated blocks): the blocks
    of one shape share one compiled graph, and the three pieces of glue around them compile once
    each. Cold, the 20 warm-up steps of --benchmark then take 16-34 s instead of the whole model's
    46 s (H100 and H200, bf16; nvfp4: 29-41 s instead of 129 s) for the same step time.
    model_graphs: CUDA graphs per region (mode="reduce-overhead") for single-GPU runs whose step
    the Trainer cannot capture whole (TE, fp16's GradScaler). Evaluation, reconstructions and
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
    here, the pool comes up while the data loads: on an H200 a wholly cold --benchmark's 20
    warm-up steps took 20.9 s instead of 27.7 s (bf16, batch 512), and its process reached
    the end of the first step 8 s sooner."""
    from torch._inductor.async_compile import maybe_warm_pool
    maybe_warm_pool()


def stop_compile_workers():
    """Call once the first steps have compiled. Inductor starts a pool of compile workers (one per
    CPU) on its first compile; with a warm cache the model compiles before they have finished
    starting, and for seconds they take the CPUs the data loader needs (H200: 50 ms steps instead
    of 7 ms for the first ~6 s). A later compile would start them again."""
    from torch._inductor.async_compile import shutdown_compile_workers
    shutdown_compile_workers()


class Trainer:
    """Model, optimizer, scaler and loss guard; `step` runs one optimizer step.

    On one GPU with compile on (PyTorch backend, bf16 or fp32), the whole step (forward,
    backward, gradient norm, loss guard, fused AdamW) is captured in one CUDA graph after two
    warm-up steps and replayed: the host then launches one graph per step. Compiled with
    per-model CUDA graphs instead, the host spent ~7 ms a step (H100, bf16, batch 512: about
    the GPU's time) and the data loader could not keep up."""

    def __init__(self, args, device, rank=0, world=1):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.model, self.backend, self.recipe, self.model_lines = build_model(args, device)
        fp16 = args.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        single_gpu = device.type == "cuda" and world == 1
        # TE has its own graph API (te.make_graphed_callables)
        self.graphed = args.compile and single_gpu and self.scaler is None and self.backend != "te"
        self.optimizer = make_optimizer(self.model, args, capturable=self.graphed)
        self.guard = nvfp4.LossGuard(args.max_bad_steps, device)
        if args.compile:
            compile_model(self.model, single_gpu and not self.graphed)
        self.net = self.model if world == 1 else nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.amp = amp_context(args)
        self.te_amp = te_backend.autocast(self.backend, self.recipe)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)
        self.graph, self.warm_steps, self.static_inputs, self.static_outputs = None, 0, None, None

    @property
    def backend_name(self) -> str:
        """The backend line of the model's log lines, without its 'backend: ' label."""
        return self.model_lines[0].removeprefix("backend: ")

    def step(self, imgs, noise, lr: float, step: int):
        """One optimizer step (number `step`, from 1); returns loss, grad norm, skipped (0/1), mask
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

    def _set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            if not self.graphed:
                group["lr"] = lr
            elif isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda:
                group["lr"].fill_(lr)  # the graph reads it from the device
            else:  # before the capture (a checkpoint may have brought a float)
                group["lr"] = torch.tensor(lr, dtype=torch.float32, device=self.device)

    def _step(self, imgs, noise):
        with self.amp, self.te_amp:
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


# ----------------------------------------------------------------------------- outputs

def atomic_save(obj, path: Path):
    """torch.save to a temp file, fsync, rename: a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


def json_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("explicit",)}


def save_checkpoint(trainer, run_dir: Path, progress: dict, keep_last: int) -> Path:
    """model, optimizer, scaler, loss guard, progress (epoch, batch, step, running sums), args, RNG."""
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "scaler": trainer.scaler.state_dict() if trainer.scaler else None, "guard": trainer.guard.state_dict(),
             "progress": progress, "args": json_args(trainer.args), "rng": rng_state(trainer.device)}
    path = run_dir / f"checkpoint_step{progress['step']:08d}.pt"
    atomic_save(state, path)
    for old in sorted(run_dir.glob("checkpoint_step*.pt"))[:-keep_last]:
        old.unlink()
    return path


def find_checkpoint(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("checkpoint_step*.pt"))
        if not found:
            raise UsageError(f"--resume {path}: no checkpoint_step*.pt in this folder")
        return found[-1]
    if not p.is_file():
        raise UsageError(f"--resume/--eval {path}: no such checkpoint file or run folder")
    return p


def load_checkpoint(path: Path) -> dict:
    """A checkpoint is untrusted input: weights_only=True unpickles tensors and plain data only."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"checkpoint {path} cannot be read: corrupt, truncated or not a checkpoint "
                         f"({type(error).__name__})") from None
    missing = {"model", "optimizer", "args", "progress"} - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        raise UsageError(f"checkpoint {path} is not from asmae_minimal.py (missing {', '.join(sorted(missing))})")
    return ckpt


def load_model_state(model, state: dict, source: str):
    """Load weights from either backend: TE's `_extra_state` entries carry no weights."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise UsageError(f"{source} holds a different model ({len(wrong)} mismatched tensors, e.g. {wrong[0]})")
    model.load_state_dict(state, strict=False)


def merge_resume_args(ckpt_args: dict, args):
    """The checkpoint's config, with harmless explicit changes applied and conflicts refused."""
    merged = argparse.Namespace(**ckpt_args)
    changes = []
    for key in args.explicit:
        if key in ("resume",):
            continue
        old, new = ckpt_args.get(key), getattr(args, key)
        if key in RESUME_CONFLICTS and old != new:
            raise UsageError(f"--{key.replace('_', '-')} {new} conflicts with the checkpoint ({key}={old}); "
                             f"a resumed run keeps its model, data and precision")
        if old != new:
            changes.append(f"{key} {old} -> {new}")
        setattr(merged, key, new)
    merged.device = args.device
    merged.resume, merged.explicit = args.resume, args.explicit
    merged.amp = ckpt_args["amp"] if "amp" not in args.explicit else args.amp
    return merged, changes


class RunLog:
    """metrics.jsonl (appended), stdout lines and optional W&B, written by rank 0 only."""

    def __init__(self, run_dir: Path, args, active: bool):
        self.active, self.wandb = active, None
        self.file = open(run_dir / "metrics.jsonl", "a") if active else None
        if active and args.use_wandb:
            import wandb
            self.wandb = wandb.init(project=args.wandb_project, name=run_dir.name, dir=str(run_dir),
                                    config=json_args(args), resume="allow")

    def metrics(self, record: dict):
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
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


def make_run_dir(args) -> Path:
    out = Path(args.out_dir)
    if args.run_name:
        run_dir = out / args.run_name
        if run_dir.exists() and any(run_dir.iterdir()):
            if not args.overwrite:
                raise UsageError(f"{run_dir} exists; pass --overwrite to replace it, another --run-name, "
                                 f"or --resume {run_dir} to continue it")
            shutil.rmtree(run_dir)
    else:
        base = out / f"{args.dataset}-{args.model}-{args.precision}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def reconstruct(model, imgs, noise, args):
    """(loss, originals, visible-only, reconstruction with visible patches pasted in), de-normalized."""
    p = args.patch_size
    with amp_context(args):
        loss, pred, mask = model(imgs, noise)
    pred, target = pred.float(), patchify(imgs, p)
    if args.norm_pix_loss:  # back to pixels with each patch's own statistics, as MAE's visualization
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask.unsqueeze(-1)
    mean, std = (torch.tensor(s, device=imgs.device).view(1, 3, 1, 1) for s in dataset_stats(args.dataset))
    show = lambda patches: (unpatchify(patches.contiguous(), p) * std + mean).clamp(0, 1)
    return loss.item(), show(target), show(target * (1 - m)), show(pred * m + target * (1 - m)), mask


def save_reconstructions(model, eval_images, args, run_dir: Path, epoch: int) -> Path:
    """runs/<run>/recons/final_recon_epXXXX.{png,pt}: rows original | visible-only | reconstruction;
    the same files are copied to <out-dir>/recons/ as the latest run's view."""
    device = next(model.parameters()).device
    imgs = plain_batches(eval_images, args, 8).to(device)
    noise = torch.rand(len(imgs), (args.img_size // args.patch_size) ** 2,
                       generator=torch.Generator().manual_seed(args.seed)).to(device)
    was_training = model.training
    model.eval()
    loss, originals, visible, recon, mask = reconstruct(model, imgs, noise, args)
    model.train(was_training)
    folder = run_dir / "recons"
    folder.mkdir(exist_ok=True)
    png = folder / f"final_recon_ep{epoch:04d}.png"
    save_image(make_grid(torch.cat([originals, visible, recon]).cpu(), nrow=len(imgs)), png)
    torch.save({"imgs": originals.cpu(), "visible": visible.cpu(), "recon": recon.cpu(),
                "mask": mask.cpu(), "loss": loss}, png.with_suffix(".pt"))
    latest = Path(args.out_dir) / "recons"
    latest.mkdir(parents=True, exist_ok=True)
    for f in (png, png.with_suffix(".pt")):
        shutil.copyfile(f, latest / f.name)
    return png


class StopRequest:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit. A second Ctrl-C exits at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            os._exit(130)
        self.signal = sig
        tqdm.write(f"[stop] {signal.Signals(sig).name}: finishing this step, then checkpoint and exit "
                   f"(Ctrl-C again to quit now)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, sig, checkpoint):
        super().__init__(f"stopped by {signal.Signals(sig).name}; checkpoint {checkpoint}")
        self.sig, self.checkpoint = sig, checkpoint


# ----------------------------------------------------------------------------- training

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

    def mean(self, kind: str, world: int) -> float:
        """Mean loss since the last reset (over all ranks), then reset."""
        total = all_reduce_sum(torch.stack([self.sums[f"{kind}_loss"], self.sums[f"{kind}_count"]]), world)
        self.sums[f"{kind}_loss"].zero_()
        self.sums[f"{kind}_count"].zero_()
        return (total[0] / total[1].clamp_min(1)).item()

    def state_dict(self, epoch: int, batch: int) -> dict:
        return {"epoch": epoch, "batch": batch, "step": self.step,
                "sums": {k: v.item() for k, v in self.sums.items()}}


def all_reduce_sum(t, world):
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class Run:
    """One training run: data, trainer, run folder, log and progress; `train` runs it."""

    def __init__(self, args, rank=0, world=1, ckpt=None, resume_changes=()):
        self.args, self.rank, self.world = args, rank, world
        self.device = torch.device(args.device)
        if args.batch_size % world:
            raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes")
        seed_everything(seed_for(args.seed, rank))
        self.train_images, self.train_labels, train_ds = load_images(args, train=True)
        self.eval_images, self.eval_labels, _ = load_images(args, train=False)
        if len(self.train_images) < args.batch_size:
            raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(self.train_images)} training images")
        self.loader = (TensorLoader(self.train_images, args, rank, world) if args.loader == "tensor"
                       else TorchvisionLoader(train_ds, args, rank, world))
        torch.manual_seed(args.seed)  # the same initial weights on every rank and backend
        self.trainer = Trainer(args, self.device, rank, world)
        seed_everything(seed_for(args.seed, rank))  # per-rank streams again (stochastic rounding)
        self.progress = Progress(self.device, ckpt["progress"] if ckpt else None)
        if ckpt is not None:
            self._restore(ckpt)
        self.run_dir = Path(args.resume_dir) if ckpt is not None else (make_run_dir(args) if rank == 0 else None)
        self.log = RunLog(self.run_dir, args, rank == 0)
        if rank == 0 and ckpt is None:
            (self.run_dir / "config.json").write_text(json.dumps(json_args(args), indent=2))
        self.summary = {"curve": [], "run_dir": str(self.run_dir), "backend": self.trainer.backend_name}
        self.fp4_rows = {}
        self._announce(resume_changes, ckpt is not None)

    def _restore(self, ckpt):
        trainer = self.trainer
        load_model_state(trainer.model, ckpt["model"], "the checkpoint")
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        if trainer.scaler and ckpt["scaler"]:
            trainer.scaler.load_state_dict(ckpt["scaler"])
        trainer.guard.load_state_dict(ckpt["guard"])
        if self.world == 1:
            set_rng_state(ckpt["rng"], self.device)
        else:  # DDP ranks re-derive their RNG (used by stochastic rounding only) from seed, rank, step
            torch.manual_seed(seed_for(self.args.seed, self.rank, self.progress.step))

    def _announce(self, resume_changes, resumed):
        args, cfg, log = self.args, self.trainer.model.cfg, self.log
        noise = " (random noise: smoke runs and benchmarks only)" if args.dataset == "fake" else ""
        log.print(f"[run] {self.run_dir}  |  {args.dataset}: {len(self.train_images)} train images{noise}, "
                  f"{args.loader} loader on {self.device}")
        log.print(f"[model] {args.model}: encoder {cfg.embed_dim}x{cfg.depth}, decoder {cfg.decoder_embed_dim}x"
                  f"{cfg.decoder_depth}, {args.img_size}px / patch {args.patch_size} = {cfg.num_patches} patches, "
                  f"{cfg.num_visible} visible | {sum(p.numel() for p in self.trainer.model.parameters()) / 1e6:.2f}M params")
        for line in self.trainer.model_lines:
            log.print(f"[precision] {line}")
        log.print(f"[optim] batch {args.batch_size} ({self.world} process{'es' if self.world > 1 else ''}), "
                  f"lr {args.lr:.3g}, warmup {args.warmup_epochs} of {args.epochs} epochs, AMP "
                  f"{'on' if args.amp else 'off'}, compile {'on' if args.compile else 'off'}"
                  f"{' (whole step in one CUDA graph)' if self.trainer.graphed else ''}, seed {args.seed}")
        for change in resume_changes:
            log.print(f"[resume] {change}")
        if resumed:
            p = self.progress
            log.print(f"[resume] from step {p.step} (epoch {p.epoch + 1}, batch {p.batch})")

    def train(self) -> dict:
        """All epochs; a checkpoint every --save-every epochs and at the end; reconstructions."""
        stop = StopRequest()
        stop.install()
        self.start_time = time.perf_counter()
        try:
            for epoch in range(self.progress.epoch, self.args.epochs):
                self._epoch(epoch, stop)
                if self.rank == 0 and ((epoch + 1) % self.args.save_every == 0 or epoch + 1 == self.args.epochs):
                    self.summary["checkpoint"] = str(self._checkpoint(epoch + 1, 0))
        except nvfp4.NonFiniteLossError as error:
            self.log.print(f"[stop] {error}. Last good checkpoint: {latest_checkpoint(self.run_dir)}")
            self.log.close()
            raise
        finally:
            stop.restore()
        self._finish()
        return self.summary

    def _epoch(self, epoch, stop):
        args, p, steps = self.args, self.progress, len(self.loader)
        first = p.batch if epoch == p.epoch else 0
        t0 = interval_t0 = time.perf_counter()
        seen = interval_seen = 0
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", disable=self.rank != 0,
                   dynamic_ncols=True, leave=False)
        for b, (imgs, noise) in enumerate(self.loader.epoch(epoch, first), start=first):
            loss, grad_norm, bad, mask = self.trainer.step(imgs, noise, lr_at(p.step, steps, args), p.step + 1)
            p.step += 1
            p.add(loss, bad)
            seen, interval_seen = seen + args.batch_size, interval_seen + args.batch_size
            bar.update(1)
            if p.step == 3 and "warmup_s" not in self.summary:
                self._report_warmup()
            if p.step % args.log_every == 0:
                cfg = self.trainer.model.cfg
                check_mask(mask, len(imgs), cfg.num_patches, cfg.num_patches - cfg.num_visible)
                record = self._log_step(epoch, lr_at(p.step - 1, steps, args), grad_norm,
                                        interval_seen / (time.perf_counter() - interval_t0), imgs, noise)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['img_per_s']:.0f}")
                interval_t0, interval_seen = time.perf_counter(), 0
            if stop.signal is not None:
                bar.close()
                self._interrupt(stop.signal, epoch, b + 1)
        bar.close()
        self._log_epoch(epoch, seen, time.perf_counter() - t0)

    def _report_warmup(self):
        if self.args.compile:
            stop_compile_workers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.summary["warmup_s"] = time.perf_counter() - self.start_time
        what = "compile warm-up" if self.args.compile else "no compile"
        self.log.print(f"[speed] first 3 steps ({what}) took {self.summary['warmup_s']:.1f} s")

    def _log_step(self, epoch, lr, grad_norm, img_per_s, imgs, noise) -> dict:
        self.trainer.guard.check()
        record = {"type": "step", "step": self.progress.step, "epoch": epoch + 1,
                  "loss": self.progress.mean("interval", self.world), "lr": lr, "grad_norm": grad_norm.item(),
                  "skipped_steps": self.trainer.guard.skipped_steps(), "img_per_s": img_per_s}
        self.log.metrics(record)
        self.summary["curve"].append((record["step"], record["loss"]))
        if self.args.fp4_stats and self.rank == 0:
            rows = fp4_diagnostics(self.trainer, imgs, noise)
            self.log.metrics({"type": "fp4_stats", "step": self.progress.step, "layers": rows})
            for key, row in rows.items():
                self.fp4_rows.setdefault(key, []).append(row)
        return record

    def _log_epoch(self, epoch, seen, seconds):
        self.trainer.guard.check()
        record = {"type": "epoch", "epoch": epoch + 1, "step": self.progress.step,
                  "loss": self.progress.mean("epoch", self.world), "skipped_steps": self.trainer.guard.skipped_steps(),
                  "time_s": seconds, "img_per_s": seen / seconds}
        self.log.metrics(record)
        skipped = f"  skipped {record['skipped_steps']}" if record["skipped_steps"] else ""
        self.log.print(f"epoch {epoch + 1}/{self.args.epochs}  loss {record['loss']:.4f}  "
                       f"{record['img_per_s']:.0f} img/s  {seconds:.1f} s{skipped}")
        self.summary.update(final_loss=record["loss"], img_per_s=record["img_per_s"])

    def _checkpoint(self, epoch, batch) -> Path:
        return save_checkpoint(self.trainer, self.run_dir, self.progress.state_dict(epoch, batch), self.args.keep_last)

    def _interrupt(self, sig, epoch, batch):
        checkpoint = None
        if self.rank == 0:
            checkpoint = self._checkpoint(epoch, batch)
            save_reconstructions(self.trainer.model, self.eval_images, self.args, self.run_dir, epoch)
            self.log.print(f"[stop] checkpoint {checkpoint}; continue with --resume {self.run_dir}")
        self.log.close()
        raise Interrupted(sig, checkpoint)

    def _finish(self):
        if self.rank == 0:
            self.summary["recon"] = str(save_reconstructions(self.trainer.model, self.eval_images, self.args,
                                                             self.run_dir, self.args.epochs))
            self.log.print(f"[final] reconstructions: {self.summary['recon']} "
                           f"(rows: original | visible | reconstruction)")
            if self.fp4_rows:
                self.summary["fp4_stats"] = summarize_fp4(self.fp4_rows, self.log)
        if self.device.type == "cuda":
            self.summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.log.close()


def latest_checkpoint(run_dir):
    found = sorted(Path(run_dir).glob("checkpoint_step*.pt")) if run_dir else []
    return found[-1] if found else "none yet"


@torch.compiler.set_stance("force_eager")
def fp4_diagnostics(trainer, imgs, noise):
    """One eager forward/backward with NVFP4 statistics on (no optimizer step, training RNG untouched)."""
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), nvfp4.collect_fp4_stats() as stats:
        with trainer.amp:
            loss, _, _ = trainer.model(imgs, noise)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
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


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_metrics(model, images, args, limit=10_000, batch=256):
    """Masked-patch MSE (normalized space) and PSNR of masked pixels in [0, 1], fixed masks."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed_for(args.seed, 7))
    loss_sum, sq_err, pixels, n = 0.0, 0.0, 0.0, min(limit, len(images))
    for start in range(0, n, batch):
        imgs = plain_batches(images[start:min(start + batch, n)], args, batch).to(device)
        noise = torch.rand(len(imgs), (args.img_size // args.patch_size) ** 2, generator=g).to(device)
        loss, originals, _, recon, mask = reconstruct(model, imgs, noise, args)
        pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, args.patch_size ** 2 * 3).contiguous(),
                                args.patch_size)
        sq_err += ((recon - originals).square() * pixel_mask).sum().item()
        pixels += pixel_mask.sum().item()
        loss_sum += loss * len(imgs)
    return {"heldout_loss": loss_sum / n, "psnr_masked": psnr(sq_err / max(pixels, 1))}


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def extract_features(model, images, args, batch=512):
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(images), batch):
        with amp_context(args):
            feats.append(model.features(plain_batches(images[start:start + batch], args, batch).to(device)).float())
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


def evaluate(model, args, train_images, train_labels, eval_images, eval_labels) -> dict:
    model.eval()
    results = heldout_metrics(model, eval_images, args)
    if train_labels is not None and eval_labels is not None and len(train_labels.unique()) > 1:
        device = next(model.parameters()).device
        train_x, test_x = extract_features(model, train_images, args), extract_features(model, eval_images, args)
        train_y, test_y = train_labels.to(device), eval_labels.to(device)
        results["linear_probe_acc"] = linear_probe(train_x, train_y, test_x, test_y, seed=args.seed)
        results["knn_acc"] = knn_accuracy(train_x, train_y, test_x, test_y)
        results["chance_acc"] = 1.0 / len(train_labels.unique())
    model.train()
    return results


def run_eval(args):
    """--eval CKPT: rebuild the checkpoint's model, evaluate it, write eval_<ckpt>.json beside it."""
    path = find_checkpoint(args.eval)
    ckpt = load_checkpoint(path)
    eval_args = argparse.Namespace(**ckpt["args"])
    eval_args.device, eval_args.compile = args.device, False
    if "data_root" in args.explicit:
        eval_args.data_root = args.data_root
    device = torch.device(args.device)
    model = build_model(eval_args, device)[0]
    load_model_state(model, ckpt["model"], str(path))
    train_images, train_labels, _ = load_images(eval_args, train=True)
    eval_images, eval_labels, _ = load_images(eval_args, train=False)
    results = evaluate(model, eval_args, train_images, train_labels, eval_images, eval_labels)
    results["checkpoint"], results["step"] = str(path), ckpt["progress"]["step"]
    out = path.with_name(f"eval_{path.stem}.json")
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"[eval] written to {out}")
    return results


# ----------------------------------------------------------------------------- comparison

def run_compare(args):
    """Train the same config, seed and data order per precision; write compare/ with a table,
    loss curves and the reconstructions side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    precisions = [p for p in args.compare.split(",") if p]
    root = make_run_dir(argparse.Namespace(**{**vars(args), "precision": "compare"}))
    results = {}
    for precision in precisions:
        sub = copy.copy(args)
        sub.precision, sub.compare, sub.overwrite = precision, None, False
        sub.amp = {"bf16": True, "fp32": False}.get(precision, args.amp)
        sub.out_dir, sub.run_name = str(root), precision
        sub.fp4_stats = args.fp4_stats and precision == "nvfp4"
        if precision != "nvfp4":
            sub.no_rht = sub.no_stochastic_rounding = sub.no_2d_weights = False
        print(f"\n===== {precision} =====")
        run = Run(sub)
        summary = run.train()
        summary.update(evaluate(run.trainer.model, sub, run.train_images, run.train_labels,
                                run.eval_images, run.eval_labels))
        results[precision] = summary
        del run
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    folder = root / "compare"
    folder.mkdir()
    write_compare_table(results, folder / "table.md", args)
    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, s in results.items():
        if s["curve"]:
            ax.plot(*zip(*s["curve"]), label=precision)
    ax.set(xlabel="step", ylabel="train loss (masked MSE)", yscale="log", title="MAE pretraining loss by precision")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=120)
    grids = [transforms.functional.to_tensor(Image.open(s["recon"]).convert("RGB")) for s in results.values()]
    save_image(torch.cat(grids, 1), folder / "recons.png")
    (folder / "results.json").write_text(json.dumps(
        {p: {k: v for k, v in s.items() if k != "curve"} for p, s in results.items()}, indent=2, default=str))
    print(f"\n{(folder / 'table.md').read_text()}\n[compare] {folder}: table.md, loss_curves.png, recons.png "
          f"(top to bottom: {', '.join(results)})")
    return results


def write_compare_table(results, path, args):
    ref = results.get("bf16") or next(iter(results.values()))
    ref_name = "bf16" if "bf16" in results else next(iter(results))
    cols = ["precision", "final loss", f"gap vs {ref_name}", "held-out loss", "PSNR masked (dB)",
            "probe acc", "kNN acc", "img/s", "peak mem (GiB)", "backend"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for precision, s in results.items():
        gap = 100 * (s["final_loss"] - ref["final_loss"]) / ref["final_loss"]
        fmt = lambda key, f: f.format(s[key]) if key in s else "n/a"
        lines.append("| " + " | ".join([precision, f"{s['final_loss']:.4f}", f"{gap:+.2f}%", fmt("heldout_loss", "{:.4f}"),
                                        fmt("psnr_masked", "{:.2f}"), fmt("linear_probe_acc", "{:.3f}"),
                                        fmt("knn_acc", "{:.3f}"), fmt("img_per_s", "{:.0f}"),
                                        fmt("peak_mem_gib", "{:.2f}"), s["backend"].split(" (")[0]]) + " |")
    lines.append(f"\n{args.dataset}, model {args.model}, {args.img_size}px/patch {args.patch_size}, "
                 f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}; loss = mean masked MSE of the last epoch.")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- benchmark

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


def run_benchmark(args, warmup_steps=20):
    """--benchmark N: warm up (compile), time N steps; img/s, step ms, peak memory, data wait, MFU."""
    device = torch.device(args.device)
    if device.type != "cuda":
        raise UsageError("--benchmark measures GPU time; run it on a CUDA device")
    seed_everything(args.seed)
    trainer = Trainer(args, device)
    cfg = trainer.model.cfg
    if args.benchmark_synthetic:
        g = torch.Generator().manual_seed(args.seed)
        batch = (torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
                 torch.rand(args.batch_size, cfg.num_patches, generator=g).to(device))
        batches = itertools.repeat(batch)
    else:
        images, _, dataset = load_images(args, train=True)
        loader = TensorLoader(images, args) if args.loader == "tensor" else TorchvisionLoader(dataset, args)
        batches = (b for epoch in range(10 ** 6) for b in loader.epoch(epoch))
    for line in trainer.model_lines:
        print(f"[precision] {line}")
    t0 = time.perf_counter()
    for step in range(warmup_steps):
        trainer.step(*next(batches), args.lr, step)
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    if args.compile:
        stop_compile_workers()
    torch.cuda.reset_peak_memory_stats(device)
    data_source = "synthetic" if args.benchmark_synthetic else args.loader
    if data_source == "torchvision":
        loader.wait_s = 0.0
    data_spans = []  # (before, after) each batch's loader work, on the training stream
    start = gpu_mark()
    t0 = time.perf_counter()
    for step in range(args.benchmark):
        before = gpu_mark() if data_source == "tensor" else None
        batch = next(batches)
        if data_source == "tensor":
            data_spans.append((before, gpu_mark()))
        trainer.step(*batch, args.lr, warmup_steps + step)
    end = gpu_mark()
    torch.cuda.synchronize(device)
    gpu_ms = start.elapsed_time(end)
    wall_ms = (time.perf_counter() - t0) * 1e3
    if data_source == "tensor":  # GPU time from the end of a step to the batch's last kernel (host waits included)
        data_ms = sum(before.elapsed_time(after) for before, after in data_spans)
    elif data_source == "torchvision":  # the host waits on the DataLoader workers while the GPU runs dry
        data_ms = loader.wait_s * 1e3
    else:
        data_ms = 0.0
    peak_tflops = measure_bf16_peak(device)
    img_s = args.batch_size * args.benchmark / (wall_ms / 1e3)
    flops = flops_per_image(cfg)
    result = {"precision": args.precision, "backend": trainer.backend_name, "mode": "model only (synthetic batch)"
              if args.benchmark_synthetic else f"end to end ({args.loader} loader)", "batch": args.batch_size,
              "img_size": args.img_size, "patch_size": args.patch_size, "model": args.model, "compile": args.compile,
              "img_per_s": img_s, "step_ms": wall_ms / args.benchmark, "gpu_step_ms": gpu_ms / args.benchmark,
              "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
              "data_wait_pct": 100 * data_ms / gpu_ms, "warmup_s": warmup_s, "gflop_per_img": flops / 1e9,
              "bf16_peak_tflops": peak_tflops, "mfu_pct": 100 * flops * img_s / (peak_tflops * 1e12)}
    print(f"[benchmark] FLOPs/img = 3 x (enc: depth x (2 T_e (4 D^2 + 2 D H) + 4 T_e^2 D) + dec: same with "
          f"T_d, D_d, H_d + embed/pred matmuls), T_e = visible + 1, T_d = patches + 1 -> {flops / 1e9:.3f} GFLOP")
    for key, value in result.items():
        print(f"[benchmark] {key:18s} {value:.3f}" if isinstance(value, float) else f"[benchmark] {key:18s} {value}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmarks.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


# ----------------------------------------------------------------------------- main

def main(argv=None):
    try:
        args = resolve_args(argv)
        if args.eval:
            return run_eval(args)
        if args.compile:
            start_compile_workers()
        if args.benchmark:
            return run_benchmark(args)
        if args.compare:
            return run_compare(args)
        rank, world = init_distributed()
        ckpt, changes = None, []
        if args.resume:
            path = find_checkpoint(args.resume)
            ckpt = load_checkpoint(path)
            args, changes = merge_resume_args(ckpt["args"], args)
            args.resume_dir = str(path.parent)
        return Run(args, rank, world, ckpt, changes).train()
    except UsageError as error:
        print(f"asmae_minimal.py: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except nvfp4.NonFiniteLossError as error:
        print(f"asmae_minimal.py: stopped: {error}", file=sys.stderr)
        raise SystemExit(3)
    except Interrupted as stopped:
        print(f"asmae_minimal.py: {stopped}", file=sys.stderr)
        raise SystemExit(128 + stopped.sig)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
