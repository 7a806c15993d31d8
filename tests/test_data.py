"""workbench/data.py: CIFAR in its on-disk format, image folders (ranges, unreadable and oversized
files), the tensor loader (per-sample, deterministic) and the torchvision loader."""
import numpy as np
import pytest
import torch
from PIL import Image

import asmae_minimal
from conftest import bypass_md5, cli, metrics, write_cifar, write_image_folder
from workbench import data, errors


def test_folder_dataset_skips_unreadable_files(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=10, size=40)
    (root / "class0" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored: not an image extension")
    images, labels = data.folder_images(str(root), train=True, size=32)
    assert "skipped 1 unreadable file" in capsys.readouterr().out
    assert images.shape == (18, 3, 32, 32) and images.dtype == torch.uint8  # 21 files: every 10th held out
    assert sorted(labels.unique().tolist()) == [0, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(flat / "a.png")
    images, labels = data.folder_images(str(flat), train=True, size=32)
    assert images.shape == (1, 3, 32, 32) and labels is None  # no class subfolders: no labels
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "a.png").write_bytes(b"garbage")
    with pytest.raises(errors.UsageError, match="none of the 1 image files could be read"):
        data.folder_images(str(bad), train=True, size=32)


def test_an_oversized_image_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=10)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(root / "class0" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64 x 64 > 2 x 1500: PIL's DecompressionBombError
    images, labels = data.folder_images(str(root), train=True, size=32)
    assert "skipped 1 unreadable file" in capsys.readouterr().out and len(images) == 18


def test_folder_images_keep_their_range_and_the_loader_says_what_it_took(tmp_path, capsys):
    """Issue 33 item 8: a 16-bit PNG came out 99.5 % white, a float TIFF all black, GIFs were
    ignored, and with fewer than 10 images held-out metrics silently used the training images."""
    root = tmp_path / "mixed"
    root.mkdir()
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(root / "deep.png")  # mode I;16
    Image.fromarray(ramp.astype(np.float32), mode="F").save(root / "float.tif")
    Image.fromarray((ramp * 1000).astype(np.float32), mode="F").save(root / "radiance.tif")  # no range to take
    Image.fromarray((ramp * 255).astype(np.uint8)).convert("P").save(root / "anim.gif")
    (root / "notes.txt").write_text("not an image")
    images, _ = data.folder_images(str(root), train=True, size=32)
    out = capsys.readouterr().out
    assert len(images) == 3  # the PNG, the [0, 1] TIFF, the GIF; the [0, 1000] TIFF skipped and counted
    for image in images.float():
        assert abs(image.mean().item() - 127.5) < 3  # the ramp's mean, in 8 bits
    assert "4 images, 0 held out" in out and "held-out metrics use the training images" in out
    assert "ignored 1 other files (.txt)" in out and "skipped 1 unreadable file(s)" in out


def test_cifar100_and_torchvision_loader(tmp_path, monkeypatch):
    bypass_md5(monkeypatch)
    data = write_cifar(tmp_path / "data", hundred=True)
    _, run_dir = cli(tmp_path, "--dataset", "cifar100", "--data-root", str(data), "--epochs", "1",
                     "--loader", "torchvision", "--num-workers", "0", "--randaugment")
    assert metrics(run_dir)[-1]["type"] == "epoch"


def test_tensor_loader_is_per_sample_and_deterministic(tmp_path):
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--dataset", "fake", "--batch-size", "8", "--randaugment"])
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = data.TensorLoader(images, config)
    a = next(loader.epoch(3))
    b = next(loader.epoch(3))
    c = next(loader.epoch(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    same = images[:1].expand(8, -1, -1, -1).contiguous()
    loader = data.TensorLoader(same, config)
    loader.images = same
    x, _ = loader._make(torch.zeros(8, dtype=torch.long), 0, 0)
    assert len({round(v, 4) for v in x.flatten(1).mean(1).tolist()}) == 8  # one image, 8 different views
