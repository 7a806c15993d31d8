"""workbench/cli.py and the script end to end on CPU: the config (frozen, resolved once, round trip,
resume merge, --compare variants, TE's environment), a run on CIFAR's on-disk format, bad inputs."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import asmae_minimal
from conftest import cli, metrics
from workbench import cli as workbench_cli, errors


# ---- model pieces -----------------------------------------------------------------------------


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
    "backend te on cpu": (["--precision", "nvfp4", "--backend", "te", "--dataset", "fake"], "--backend te: "),
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
    real = workbench_cli.importlib.util.find_spec
    monkeypatch.setattr(workbench_cli.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, "--use-wandb", "--dataset", "fake")
    assert exit_info.value.code == 2 and "pip install wandb" in capsys.readouterr().err


def test_help_documents_every_flag_and_readme_points_to_it(capsys):
    """--help is the flag reference (README keeps an overview, issue 32): every flag there, with help."""
    with pytest.raises(SystemExit):
        asmae_minimal.main(["--help"])
    help_text = capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    actions = [a for a in workbench_cli.build_parser(asmae_minimal.Config)._actions if a.option_strings and "--help" not in a.option_strings]
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
    assert command.mode == "train" and {"preset", "disable_rht", "precision", "device"} <= command.explicit
    assert config.precision.precision == "nvfp4" and config.precision.disable_rht and not config.precision.amp
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
    assert command.mode == "compare" and [v.config.precision.precision for v in command.variants] == ["fp32", "bf16", "nvfp4"]
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
    merged, changes = workbench_cli.resume_config(saved, cli, command.explicit)
    assert (merged.optim.epochs, merged.optim.blr, merged.optim.peak_lr) == (4, 3e-4, 3e-4 * 32 / 256)
    assert changes == ["blr 0.00015 -> 0.0003", "epochs 2 -> 4"]
    command, cli = asmae_minimal.parse_config(["--device", "cpu", "--resume", "x", "--precision", "nvfp4"])
    with pytest.raises(errors.UsageError, match="--precision nvfp4 conflicts with the checkpoint"):
        workbench_cli.resume_config(saved, cli, command.explicit)


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
    assert (p.backend, p.amp_dtype, p.recipe.disable_rht) == ("emulated", torch.bfloat16, True)
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
