"""The GPU loader's Triton augmentation kernel against augment.py, its specification: on the GPU,
and on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
import os

import pytest
import torch

from conftest import REPO, requires_cuda, run_python

CHECK = r"""
import itertools, sys, torch
sys.path.insert(0, {repo!r})
from workbench import augment, augment_kernel
device = {device!r}
g = torch.Generator().manual_seed(0)
orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 jitter orders
mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
# one tile (32 px); several tiles, the last partial, from a non-square source (40 px); a downscale
for height, width, size in ((32, 32, 32), (32, 24, 40), (16, 16, 8)):
    imgs = torch.randint(0, 256, (48, 3, height, width), generator=g, dtype=torch.uint8)
    p = augment.sample_params(48, height, width, g, randaugment=False)
    p["jitter_order"] = orders.repeat(2, 1)
    assert p["flip"].any() and not p["flip"].all()
    expected = augment.apply(imgs, p, size)
    on_device = {{k: v.to(device) for k, v in p.items()}}
    out = augment_kernel.crop_flip_jitter(imgs.to(device), on_device, size).cpu()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    out = augment_kernel.crop_flip_jitter(imgs.to(device), on_device, size, mean.to(device), std.to(device)).cpu()
    torch.testing.assert_close(out, (expected - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-4, rtol=0)
    print("matches", size)
"""


def run_check(device: str, env=None):
    stdout = run_python(CHECK.format(repo=str(REPO), device=device), env=env)
    for size in (32, 40, 8):
        assert f"matches {size}" in stdout


def test_augment_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    run_check("cpu", env=dict(os.environ, TRITON_INTERPRET="1"))


@requires_cuda
def test_augment_kernel_on_gpu():
    run_check("cuda")


def test_per_sample_hue_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF
    from workbench import augment
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    x[0], x[1, :, :2] = 0.5, x[1, 0, :2]  # gray pixels: no hue
    shift = torch.tensor([0.1, -0.1, 0.05, -0.05, 0.0, 0.099])
    expected = torch.stack([TF.adjust_hue(img, s.item()) for img, s in zip(x, shift)])
    assert (augment._adjust_hue(x, shift) - expected).abs().max() < 1e-6
