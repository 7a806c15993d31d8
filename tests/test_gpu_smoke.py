"""GPU smoke runs (skipped without CUDA; run on the device): every precision trains a few steps
with compile on and off, and the loss is finite."""
import json

import pytest

import asmae_minimal
from conftest import requires_cuda
from test_cli import write_image_folder


@requires_cuda
@pytest.mark.parametrize("compile_flag", ["--no-compile", "--compile"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8", "nvfp4"])
def test_each_precision_trains_on_gpu(tmp_path, precision, compile_flag):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=48)
    amp = ["--no-amp"] if precision == "fp32" else ["--amp"]
    summary = asmae_minimal.main(["--dataset", "folder", "--data-root", str(data), "--model", "tiny",
                                  "--precision", precision, compile_flag, *amp, "--batch-size", "32",
                                  "--epochs", "2", "--log-every", "1", "--out-dir", str(tmp_path / "runs"),
                                  "--run-name", "smoke"])
    lines = [json.loads(l) for l in (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if l["type"] == "step"]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert summary["peak_mem_gib"] > 0 and "cuda" in open(tmp_path / "runs" / "smoke" / "config.json").read()
