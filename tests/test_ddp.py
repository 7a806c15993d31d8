"""torchrun with 2 CPU processes (gloo): same weights as one process at the same global batch,
and only rank 0 writes."""
import socket
import subprocess
import sys

import torch

from conftest import REPO, write_image_folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=40)
    common = [str(REPO / "asmae_minimal.py"), "--device", "cpu", "--model", "tiny", "--dataset", "folder",
              "--data-root", str(data), "--batch-size", "16", "--epochs", "2", "--log-every", "2",
              "--out-dir", str(tmp_path / "runs")]
    single = subprocess.run([sys.executable, *common, "--run-name", "single"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), *common, "--run-name", "ddp"],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "batch 16 (2 processes)" in ddp.stdout
    load = lambda name: torch.load(sorted((tmp_path / "runs" / name).glob("checkpoint_step*.pt"))[-1],
                                   weights_only=True)
    a, b = load("single"), load("ddp")
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp", "recons", "single"]
    metrics = (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len((tmp_path / "runs" / "single" / "metrics.jsonl").read_text().splitlines())


def test_emulated_nvfp4_under_ddp(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=40)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(REPO / "asmae_minimal.py"), "--device", "cpu",
                          "--model", "tiny", "--dataset", "folder", "--data-root", str(data), "--precision", "nvfp4",
                          "--batch-size", "32", "--epochs", "1", "--log-every", "1", "--out-dir", str(tmp_path / "runs"),
                          "--run-name", "fp4"], capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    lines = (tmp_path / "runs" / "fp4" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "nvfp4: 25 of 27 GEMM layers quantized" in ddp.stdout  # 2 steps + epoch, rank 0 only
