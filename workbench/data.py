"""The images of a run and the loaders that feed its steps: CIFAR (torchvision's download), an
image folder, or fake noise, as uint8 tensors; the tensor loader (augmentation on the training
device, augment.py / augment_kernel.py) and the torchvision loader (PIL transforms in workers)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from workbench import augment
from workbench.errors import UsageError

try:
    from workbench import augment_kernel  # Triton: the GPU loader's augmentation in one kernel
except ImportError:
    augment_kernel = None


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


def load_images(config, train: bool) -> Split:
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

    def __init__(self, images, config, rank=0, world=1):
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

    def __init__(self, train: Split, config, rank=0, world=1):
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


def make_loader(config, train: Split, rank=0, world=1):
    """The --loader of training and the benchmark."""
    if config.data.loader == "tensor":
        return TensorLoader(train.images, config, rank, world)
    return TorchvisionLoader(train, config, rank, world)
