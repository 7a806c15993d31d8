"""The training CLI end to end on CPU: data fixtures in CIFAR's on-disk format, outputs, bad inputs."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import asmae_minimal


def write_cifar(root: Path, n_train=80, n_test=16, hundred=False, seed=0):
    """Files in CIFAR's python format (pickled dicts of uint8 rows), as torchvision reads them."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(n):
        labels = rng.integers(0, 100 if hundred else 10, n)
        colors = np.stack([labels * 25 % 256, labels * 75 % 256, labels * 125 % 256], 1)[:, :, None]
        data = np.clip(colors + rng.normal(0, 30, (n, 3, 1024)), 0, 255).astype(np.uint8).reshape(n, 3072)
        return {"data": data, label_key: labels.tolist(), "filenames": [f"{i}.png" for i in range(n)]}

    if hundred:
        files = {"train": batch(n_train), "test": batch(n_test), "meta": {"fine_label_names": [str(i) for i in range(100)]}}
    else:
        per = n_train // 5
        files = {f"data_batch_{i}": batch(per) for i in range(1, 6)}
        files.update(test_batch=batch(n_test), **{"batches.meta": {"label_names": [str(i) for i in range(10)]}})
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)
    return root


def write_image_folder(root: Path, classes=3, per_class=20, size=32, seed=0):
    """PNG images in class subfolders, each class its own color, plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A CIFAR-10 fixture; torchvision's md5 check is bypassed for these files (tests only)."""
    bypass_md5(monkeypatch)
    return write_cifar(tmp_path / "data")


def bypass_md5(monkeypatch):
    """torchvision checks CIFAR's files against their md5 sums; fixture files cannot match."""
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def cli(tmp_path, *argv, run_name="run"):
    """Run the CLI in-process on CPU with a tiny model; returns (summary, run folder)."""
    base = ["--device", "cpu", "--model", "tiny", "--batch-size", "16", "--out-dir", str(tmp_path / "runs"),
            "--log-every", "2"]
    summary = asmae_minimal.main(base + (["--run-name", run_name] if run_name else []) + list(argv))
    return summary, tmp_path / "runs" / run_name if run_name else None


def metrics(run_dir: Path, timing=False):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines if timing else [{k: v for k, v in l.items() if k not in ("time_s", "img_per_s")} for l in lines]


# ---- model pieces -----------------------------------------------------------------------------

def test_patchify_unpatchify_inverse():
    imgs = torch.randn(2, 3, 32, 32)
    patches = asmae_minimal.patchify(imgs, 4)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))  # row-major patches
    assert torch.equal(asmae_minimal.unpatchify(patches, 4), imgs)
    with pytest.raises(ValueError, match="contiguous"):
        asmae_minimal.patchify(imgs.transpose(2, 3), 4)


def tiny_config(**overrides):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)
    cfg.update(overrides)
    return asmae_minimal.MAEConfig(**cfg)


def test_masking_is_per_sample_and_exact():
    model = asmae_minimal.MAE(tiny_config())
    noise = torch.rand(8, 16)
    _, pred, mask = model(torch.randn(8, 3, 16, 16), noise)
    asmae_minimal.check_mask(mask, 8, 16, 12)
    kept = torch.argsort(noise, 1)[:, :4]
    assert torch.equal(mask.gather(1, kept), torch.zeros(8, 4))  # the 4 lowest-noise patches stay visible
    assert len({tuple(m.tolist()) for m in mask}) > 1  # masks differ between samples
    with pytest.raises(ValueError, match="expected exactly 12"):
        asmae_minimal.check_mask(torch.zeros(8, 16), 8, 16, 12)
    with pytest.raises(ValueError, match="not binary"):
        asmae_minimal.check_mask(torch.full((8, 16), 0.5), 8, 16, 12)


def test_sincos_pos_embed_matches_float64_formula():
    import math
    dim, grid = 16, 4
    emb = asmae_minimal.sincos_pos_embed_2d(dim, grid)[0]
    assert emb.shape == (1 + grid * grid, dim) and torch.equal(emb[0], torch.zeros(dim))
    for pos in range(grid * grid):
        w, h = pos % grid, pos // grid  # MAE: the first half of the channels encodes the column
        for half, coord in ((0, w), (1, h)):
            for i in range(dim // 4):
                omega = 1.0 / 10000 ** (i / (dim / 4))
                base = 1 + pos, half * dim // 2
                assert abs(emb[base[0], base[1] + i].item() - math.sin(coord * omega)) < 1e-6
                assert abs(emb[base[0], base[1] + dim // 4 + i].item() - math.cos(coord * omega)) < 1e-6


def test_loss_only_on_masked_patches():
    model = asmae_minimal.MAE(tiny_config())
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    loss, pred, mask = model(imgs, noise)
    target = asmae_minimal.patchify(imgs, 4)
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected)
    # changing the image on visible patches changes the encoder input but not the target of the loss:
    # the loss is exactly the masked-patch MSE computed above, never a full-image MSE
    full = ((pred - target) ** 2).mean()
    assert not torch.allclose(loss, full)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = asmae_minimal.MAE(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    imgs, noise = torch.randn(8, 3, 16, 16), torch.rand(8, 16)
    losses = []
    for _ in range(150):
        loss, _, _ = model(imgs, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_nvfp4_model_trains_on_cpu():
    torch.manual_seed(0)
    layers = asmae_minimal.nvfp4.LayerFactory(asmae_minimal.nvfp4.NVFP4Recipe(), keep_high_precision=("patch_embed", "decoder_pred"))
    model = asmae_minimal.MAE(tiny_config(embed_dim=64, decoder_embed_dim=64), layers)
    assert any(g[3] for g in model.gemms)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    imgs, noise = torch.randn(16, 3, 16, 16), torch.rand(16, 16)
    first = model(imgs, noise)[0].item()
    for _ in range(120):
        loss, _, _ = model(imgs, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_regional_compile_shares_graphs_and_evaluation_stays_eager(monkeypatch):
    """One graph per block shape and per piece of glue, whatever the depth (a per-layer guard,
    e.g. on a layer's name, would compile every block); eval passes never compile; same loss
    and gradients as the eager model. Dynamo's "eager" backend: what is tested is the tracing."""
    from functools import partial
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    layers = lambda: asmae_minimal.nvfp4.LayerFactory(asmae_minimal.nvfp4.NVFP4Recipe())
    torch.manual_seed(0)
    eager = asmae_minimal.MAE(tiny_config(embed_dim=32, decoder_embed_dim=32, depth=3, decoder_depth=2), layers())
    compiled = asmae_minimal.MAE(eager.cfg, layers())
    compiled.load_state_dict(eager.state_dict())
    asmae_minimal.compile_model(compiled, model_graphs=False)
    imgs, noise = torch.randn(16, 3, 16, 16), torch.rand(16, 16)
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same stochastic-rounding bits
        model(imgs, noise)[0].backward()
    assert counters["stats"]["unique_graphs"] == 2 + 3  # encoder and decoder blocks, three glue pieces
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(a.grad, b.grad)
    precision = asmae_minimal.nvfp4.Precision.resolve("fp32", torch.device("cpu"), amp=False)
    asmae_minimal.reconstruct(compiled, imgs[:3], noise[:3], precision, "fake")
    asmae_minimal.extract_features(compiled, torch.zeros(5, 3, 16, 16, dtype=torch.uint8), precision, "fake")
    assert counters["stats"]["unique_graphs"] == 5


# ---- the CLI end to end ---------------------------------------------------------------------------

def test_one_epoch_on_cifar_fixture(tmp_path, cifar):
    summary, run_dir = cli(tmp_path, "--dataset", "cifar10", "--data-root", str(cifar), "--epochs", "1")
    png = run_dir / "recons" / "final_recon_ep0001.png"
    assert png.exists() and (tmp_path / "runs" / "recons" / f"run_{png.name}").exists()  # the run's name on the copy
    bundle = torch.load(png.with_suffix(".pt"), weights_only=True)
    assert set(bundle) == {"imgs", "visible", "recon", "mask", "loss"}
    assert bundle["imgs"].shape == bundle["visible"].shape == bundle["recon"].shape == (8, 3, 32, 32)
    assert bundle["mask"].shape == (8, 64) and bundle["mask"].sum(1).eq(48).all()
    assert 0 <= bundle["recon"].min() and bundle["recon"].max() <= 1
    visible = bundle["mask"].eq(0)[0].nonzero()[0].item()  # visible patches are pasted in unchanged
    r, c = divmod(visible, 8)
    assert torch.allclose(bundle["recon"][0, :, r * 4:r * 4 + 4, c * 4:c * 4 + 4],
                          bundle["imgs"][0, :, r * 4:r * 4 + 4, c * 4:c * 4 + 4])
    with Image.open(png) as grid:  # 3 rows of 8 images, 2 px padding
        assert grid.size == (8 * 34 + 2, 3 * 34 + 2)
    ckpt = torch.load(summary["checkpoint"], weights_only=True)
    assert ckpt["progress"]["epoch"] == 1 and ckpt["progress"]["step"] == 5 and ckpt["config"]["data"]["dataset"] == "cifar10"
    lines = metrics(run_dir, timing=True)
    assert [l["type"] for l in lines] == ["step", "step", "epoch"] and all("img_per_s" in l for l in lines)
    assert json.loads((run_dir / "config.json").read_text())["optim"]["epochs"] == 1


def test_cifar100_and_torchvision_loader(tmp_path, monkeypatch):
    bypass_md5(monkeypatch)
    data = write_cifar(tmp_path / "data", hundred=True)
    _, run_dir = cli(tmp_path, "--dataset", "cifar100", "--data-root", str(data), "--epochs", "1",
                     "--loader", "torchvision", "--num-workers", "0", "--randaugment")
    assert metrics(run_dir)[-1]["type"] == "epoch"


def test_per_sample_hue_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF
    import augment
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    x[0], x[1, :, :2] = 0.5, x[1, 0, :2]  # gray pixels: no hue
    shift = torch.tensor([0.1, -0.1, 0.05, -0.05, 0.0, 0.099])
    expected = torch.stack([TF.adjust_hue(img, s.item()) for img, s in zip(x, shift)])
    assert (augment._adjust_hue(x, shift) - expected).abs().max() < 1e-6


def test_tensor_loader_is_per_sample_and_deterministic(tmp_path):
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--dataset", "fake", "--batch-size", "8", "--randaugment"])
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = asmae_minimal.TensorLoader(images, config)
    a = next(loader.epoch(3))
    b = next(loader.epoch(3))
    c = next(loader.epoch(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    same = images[:1].expand(8, -1, -1, -1).contiguous()
    loader = asmae_minimal.TensorLoader(same, config)
    loader.images = same
    x, _ = loader._make(torch.zeros(8, dtype=torch.long), 0, 0)
    assert len({round(v, 4) for v in x.flatten(1).mean(1).tolist()}) == 8  # one image, 8 different views


# ---- bad input: one line, exit code 2 ----------------------------------------------------------

BAD = {
    "unknown dataset": (["--dataset", "imagenet"], "invalid choice"),
    "mask ratio": (["--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    "patch size": (["--img-size", "30"], "not divisible by --patch-size"),
    "patch size zero": (["--patch-size", "0"], "--img-size and --patch-size must be positive"),
    "epochs": (["--epochs", "0"], "--epochs must be positive"),
    "batch": (["--batch-size", "-4"], "--batch-size must be positive"),
    "amp both": (["--amp", "--no-amp"], "not allowed with argument"),
    "cuda absent": (["--device", "cuda"], "CUDA is not available"),
    "bf16 without amp": (["--precision", "bf16", "--no-amp"], "--precision bf16 runs under AMP"),
    "fp4 stats": (["--fp4-stats"], "--fp4-stats applies to --precision nvfp4 only"),
    "nvfp4 switches on fp8": (["--precision", "fp8", "--row-scaled-activation", "--nvfp4-4over6", "weights"],
                              "--row-scaled-activation, --nvfp4-4over6 apply to --precision nvfp4 only"),
    "4over6 with rht": (["--precision", "nvfp4", "--nvfp4-4over6", "all"], "--nvfp4-4over6 all needs --no-rht"),
    "schedule on bf16": (["--high-precision-from", "0.9"], "--high-precision-from applies to --precision fp8 and nvfp4"),
    "schedule range": (["--precision", "fp8", "--high-precision-from", "1"], "--high-precision-from must be in (0, 1)"),
    "override choice": (["--precision", "fp8", "--backward-override", "fp16"], "invalid choice"),
    "backend te on cpu": (["--precision", "nvfp4", "--backend", "te", "--dataset", "fake"], "--backend te"),
    "nvfp4 shapes": (["--precision", "nvfp4", "--batch-size", "8", "--dataset", "fake"], "tokens per step M = 136"),
    "compare list": (["--compare", "bf16,bf16"], "--compare takes"),
    "compare precision": (["--compare", "bf16,int8"], "--compare variant 'int8': 'int8' is not a precision"),
    "variant switch": (["--compare", "bf16,nvfp4:epochs=3"], "'epochs' is not a precision switch"),
    "variant misfit": (["--compare", "bf16:no-rht"], "--compare variant 'bf16:no-rht': --no-rht applies to"),
    "variant combo": (["--compare", "nvfp4:nvfp4-4over6=all"], "'nvfp4:nvfp4-4over6=all': --nvfp4-4over6 all needs --no-rht"),
    "variant value": (["--compare", "nvfp4:nvfp4-4over6=some"], "variant 'nvfp4:nvfp4-4over6=some': argument --nvfp4-4over6"),
    "variant pattern": (["--compare", "bf16,nvfp4:keep-high-precision=patch_embed,nosuch", "--dataset", "fake"],
                        "variant 'nvfp4:keep-high-precision=patch_embed,nosuch': --keep-high-precision 'nosuch' matches no layer"),
    "variant shapes": (["--compare", "bf16,nvfp4", "--batch-size", "8", "--dataset", "fake"],
                       "variant 'nvfp4': layer"),
    "seeds alone": (["--seeds", "0,1"], "--seeds needs --compare"),
    "finetune alone": (["--finetune-epochs", "3"], "--finetune-epochs goes with --eval or --compare"),
    "finetune negative": (["--compare", "bf16", "--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
    "finetune precision": (["--compare", "bf16", "--finetune-precision", "fp4"], "invalid choice"),
    "seeds repeated": (["--compare", "bf16", "--seeds", "1,1"], "--seeds must be distinct"),
    "missing resume": (["--resume", "/nonexistent/ckpt.pt"], "no such checkpoint"),
    "empty folder": (["--dataset", "folder", "--data-root", "{tmp}"], "holds no images"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, monkeypatch):
    if case == "cuda absent":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, message = BAD[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        asmae_minimal.main(["--device", "cpu", "--model", "tiny", "--out-dir", str(tmp_path / "runs")] + argv
                           if case != "cuda absent" else argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_offline_cifar_says_where_to_put_the_archive(tmp_path, capsys, monkeypatch):
    import torchvision
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets.utils.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, "--dataset", "cifar10", "--data-root", str(tmp_path / "data"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cifar-10-python.tar.gz" in err and str(tmp_path / "data") in err


def test_wandb_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    real = asmae_minimal.importlib.util.find_spec
    monkeypatch.setattr(asmae_minimal.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, "--use-wandb", "--dataset", "fake")
    assert exit_info.value.code == 2 and "pip install wandb" in capsys.readouterr().err


def test_help_documents_every_flag_and_readme_points_to_it(capsys):
    """--help is the flag reference (README keeps an overview, issue 32): every flag there, with help."""
    with pytest.raises(SystemExit):
        asmae_minimal.main(["--help"])
    help_text = capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    actions = [a for a in asmae_minimal.build_parser()._actions if a.option_strings and "--help" not in a.option_strings]
    assert len(actions) > 40
    for action in actions:
        assert all(opt in help_text for opt in action.option_strings) and action.help, action.option_strings
    assert "`python asmae_minimal.py --help` is the reference" in readme
    for preset, dims in asmae_minimal.MODEL_PRESETS.items():
        assert f"{preset}: encoder {dims['embed_dim']}x{dims['depth']}" in help_text.replace("\n", " ").replace("  ", " ")


# ---- the config: parsed and resolved once, frozen ------------------------------------------------

def test_config_is_frozen_resolved_and_round_trips(tmp_path):
    import dataclasses
    command, config = asmae_minimal.parse_config(["--device", "cpu", "--model", "tiny", "--no-rht",
                                                  "--precision", "nvfp4", "--keep-high-precision", "patch_embed"])
    assert command.mode == "train" and {"preset", "disable_rht", "name", "device"} <= command.explicit
    assert config.precision.name == "nvfp4" and config.precision.disable_rht and not config.precision.amp
    assert config.precision.keep_high_precision == ("patch_embed",)
    assert config.optim.batch_size == 32 and config.optim.lr is None and config.optim.peak_lr == 1.5e-4 * 32 / 256
    assert config.model.embed_dim == asmae_minimal.MODEL_PRESETS["tiny"]["embed_dim"] and config.run.compile is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.epochs = 3
    saved = json.loads(json.dumps(dataclasses.asdict(config)))  # as config.json holds it
    assert asmae_minimal.Config.from_dict(saved) == config
    changed = config.replace(epochs=3, run_name="x")
    assert (changed.optim.epochs, changed.run.run_name, config.optim.epochs) == (3, "x", 50)


def test_compare_variants_resolve_their_own_amp_and_switches():
    command, _ = asmae_minimal.parse_config(["--device", "cpu", "--compare", "fp32,bf16,nvfp4", "--no-amp",
                                             "--no-rht", "--fp4-stats"])
    assert command.mode == "compare" and [v.config.precision.name for v in command.variants] == ["fp32", "bf16", "nvfp4"]
    fp32, bf16, fp4 = (v.config for v in command.variants)
    assert (fp32.precision.amp, bf16.precision.amp, fp4.precision.amp) == (False, True, False)
    assert fp4.precision.disable_rht and fp4.precision.fp4_stats
    assert not (bf16.precision.disable_rht or bf16.precision.fp4_stats)
    command, _ = asmae_minimal.parse_config(["--device", "cpu", "--compare", "bf16,fp8,nvfp4", "--no-rht",
                                             "--nvfp4-4over6", "all", "--high-precision-from", "0.9",
                                             "--backward-override", "dequantized"])
    bf16, fp8, fp4 = (v.config.precision for v in command.variants)
    assert (fp4.nvfp4_4over6, fp8.nvfp4_4over6, bf16.nvfp4_4over6) == ("all", "none", "none")
    assert (fp4.high_precision_from, fp8.high_precision_from, bf16.high_precision_from) == (0.9, 0.9, None)
    assert (fp8.backward_override, bf16.backward_override) == ("dequantized", None)
    recipe = asmae_minimal.resolve_precision(command.variants[2].config, torch.device("cpu")).recipe
    assert (recipe.nvfp4_4over6, recipe.disable_rht, recipe.backward_override) == ("all", True, "dequantized")
    # per-variant switches, on top of the command line's
    command, _ = asmae_minimal.parse_config([
        "--device", "cpu", "--compare", "bf16,nvfp4,nvfp4:no-rht:nvfp4-4over6=all,nvfp4:high-precision-from=0.9,"
        "nvfp4:keep-high-precision=patch_embed,decoder_pred,blocks.0.*,fp8:backward-override=dequantized",
        "--seeds", "0,1,2"])
    labels = [v.label for v in command.variants]
    assert labels[2] == "nvfp4:no-rht:nvfp4-4over6=all" and command.sweep_seeds == (0, 1, 2)
    p = {v.label: v.config.precision for v in command.variants}
    assert (p["nvfp4"].disable_rht, p["nvfp4"].nvfp4_4over6) == (False, "none")
    assert (p[labels[2]].disable_rht, p[labels[2]].nvfp4_4over6) == (True, "all")
    assert p[labels[3]].high_precision_from == 0.9 and p[labels[4]].keep_high_precision == ("patch_embed", "decoder_pred", "blocks.0.*")
    assert p[labels[5]].backward_override == "dequantized" and p["bf16"].amp


def test_resume_config_applies_given_flags_and_refuses_conflicts():
    _, saved = asmae_minimal.parse_config(["--device", "cpu", "--epochs", "2"])
    command, cli = asmae_minimal.parse_config(["--device", "cpu", "--resume", "x", "--epochs", "4", "--blr", "3e-4"])
    merged, changes = asmae_minimal.resume_config(saved, cli, command.explicit)
    assert (merged.optim.epochs, merged.optim.blr, merged.optim.peak_lr) == (4, 3e-4, 3e-4 * 32 / 256)
    assert changes == ["blr 0.00015 -> 0.0003", "epochs 2 -> 4"]
    command, cli = asmae_minimal.parse_config(["--device", "cpu", "--resume", "x", "--precision", "nvfp4"])
    with pytest.raises(asmae_minimal.UsageError, match="--precision nvfp4 conflicts with the checkpoint"):
        asmae_minimal.resume_config(saved, cli, command.explicit)


RUNS_IN_ONE_PROCESS = {"compare": ["--compare", "bf16"], "eval": ["--eval", "runs"], "benchmark": ["--benchmark", "5"]}


@pytest.mark.parametrize("mode", RUNS_IN_ONE_PROCESS)
def test_compare_eval_and_benchmark_refuse_torchrun(mode, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        asmae_minimal.main(["--device", "cpu", "--batch-size", "16", "--out-dir", str(tmp_path), *RUNS_IN_ONE_PROCESS[mode]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.endswith(f"--{mode} runs in one process; start it with python, not torchrun")
    assert not list(tmp_path.iterdir())  # nothing written


def test_modes_do_not_combine(capsys):
    with pytest.raises(SystemExit) as exit_info:
        asmae_minimal.main(["--device", "cpu", "--eval", "runs", "--compare", "bf16"])
    assert exit_info.value.code == 2 and "--eval and --compare do not go together" in capsys.readouterr().err


def test_precision_object_describes_and_autocasts():
    import nvfp4
    p = nvfp4.Precision.resolve("nvfp4", torch.device("cpu"), amp=True, recipe=nvfp4.NVFP4Recipe(disable_rht=True),
                                te_import=lambda: (None, "Transformer Engine is not installed"))
    assert (p.backend, p.amp_dtype, p.recipe.disable_rht) == ("torch", torch.bfloat16, True)
    lines = p.describe([("a", 16, 16, True), ("b", 16, 16, False)])
    assert lines == ["backend: emulated NVFP4 in PyTorch (Transformer Engine is not installed)",
                     "nvfp4: 1 of 2 GEMM layers quantized (a); high precision: b",
                     "NVFP4 recipe: RHT off (wgrad operands), stochastic rounding on (gradients), weights in 16x16 tiles"]
    for _ in range(2):  # a fresh context each time
        with p.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="cannot run precision fp8"):
        nvfp4.Precision.resolve("fp8", torch.device("cpu"), recipe=nvfp4.NVFP4Recipe())


# ---- TE's NVTE_* recipe defaults ------------------------------------------------------------

def test_recipe_switches_come_from_te_environment_variables_unless_a_flag_sets_them(monkeypatch):
    """TE 2.20 takes its recipe defaults from NVTE_* variables (common/recipe/__init__.py: a switch
    is on where its variable is "1"; the error mode is upper-cased): so does a run, where no flag
    sets the field; the other precisions ignore them."""
    monkeypatch.setenv("NVTE_NVFP4_DISABLE_RHT", "1")
    monkeypatch.setenv("NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING", "yes")  # not "1": off, as in TE
    monkeypatch.setenv("NVTE_NVFP4_4OVER6", "weights")
    monkeypatch.setenv("NVTE_NVFP4_4OVER6_ERR_MODE", "mse")
    monkeypatch.setenv("NVTE_BACKWARD_OVERRIDE", "dequantized")
    base = ["--device", "cpu", "--precision"]
    _, config = asmae_minimal.parse_config(base + ["nvfp4"])
    p = config.precision
    assert (p.disable_rht, p.disable_stochastic_rounding, p.nvfp4_4over6, p.nvfp4_4over6_err_mode,
            p.backward_override) == (True, False, "weights", "MSE", "dequantized")
    assert set(p.from_environment) == {"NVTE_NVFP4_DISABLE_RHT=1", "NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING=yes",
                                       "NVTE_NVFP4_4OVER6=weights", "NVTE_NVFP4_4OVER6_ERR_MODE=mse",
                                       "NVTE_BACKWARD_OVERRIDE=dequantized"}
    _, config = asmae_minimal.parse_config(base + ["nvfp4", "--nvfp4-4over6", "none", "--backward-override",
                                                   "high_precision"])  # flags win
    assert config.precision.nvfp4_4over6 == "none" and config.precision.backward_override == "high_precision"
    assert "NVTE_NVFP4_4OVER6=weights" not in config.precision.from_environment
    _, config = asmae_minimal.parse_config(base + ["fp8"])  # FP8 takes NVTE_BACKWARD_OVERRIDE alone
    assert config.precision.backward_override == "dequantized" and not config.precision.disable_rht
    assert config.precision.from_environment == ("NVTE_BACKWARD_OVERRIDE=dequantized",)
    _, config = asmae_minimal.parse_config(base + ["bf16"])  # no recipe: nothing taken, nothing refused
    assert config.precision.from_environment == () and config.precision.backward_override is None
    command, _ = asmae_minimal.parse_config(["--device", "cpu", "--compare", "bf16,nvfp4:no-2d-weights"])
    nvfp4_cell = command.variants[1].config.precision
    assert nvfp4_cell.disable_rht and nvfp4_cell.disable_2d_quantization and nvfp4_cell.from_environment


def test_bad_te_environment_value_exits_2_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("NVTE_NVFP4_4OVER6", "everything")
    with pytest.raises(SystemExit) as exit_info:
        asmae_minimal.main(["--device", "cpu", "--precision", "nvfp4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "NVTE_NVFP4_4OVER6 must be unset or one of none, weights, activations, all, got 'everything'" in err


def test_a_run_says_which_switches_came_from_the_environment(tmp_path, cifar, monkeypatch, capsys):
    monkeypatch.setenv("NVTE_NVFP4_DISABLE_2D_QUANTIZATION", "1")
    cli(tmp_path, "--precision", "nvfp4", "--dataset", "cifar10", "--data-root", str(cifar), "--epochs", "1")
    out = capsys.readouterr().out
    assert "[precision] from the environment, as TE takes them (a flag wins): NVTE_NVFP4_DISABLE_2D_QUANTIZATION=1" in out
    assert "weights in 1x16 blocks" in out
