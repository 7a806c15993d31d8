"""What the tests share: the repository on sys.path, TE's reference loaded with stand-ins for its
C++ parts, CIFAR files and image folders written by the tests, and the CLI run in-process."""
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Where .ci/run unpacks `transformer_engine/pytorch/custom_recipes/` from TE's wheel.
TE_REFERENCE_DIR = Path(os.environ.get("TE_REFERENCE_DIR", REPO / ".te_reference"))
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_python(*codes: str, env=None) -> str:
    """Run each code in a fresh interpreter (e.g. with TRITON_INTERPRET=1, which Triton reads at
    its import), all at once (a CPU each); their stdouts, or fail with the end of a stderr."""
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for code in codes]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    return "".join(stdout for stdout, _ in outputs)


def _stub_te_modules(recipes_dir: Path) -> dict:
    """Minimal stand-ins for the TE modules that reference_nvfp4.py imports but does not use
    for its numerics (the C++-backed base classes), so TE's own Python reference runs on CPU."""
    class Quantizer:
        def __init__(self, *, rowwise: bool, columnwise: bool) -> None:
            self.rowwise_usage, self.columnwise_usage = rowwise, columnwise

    class QuantizedTensorStorage:
        pass

    modules = {name: types.ModuleType(name) for name in (
        "transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.tensor",
        "transformer_engine.pytorch.tensor.utils", "transformer_engine.pytorch.quantized_tensor",
        "transformer_engine.pytorch.custom_recipes")}
    modules["transformer_engine.pytorch.quantized_tensor"].Quantizer = Quantizer
    modules["transformer_engine.pytorch.quantized_tensor"].QuantizedTensorStorage = QuantizedTensorStorage
    modules["transformer_engine.pytorch.tensor.utils"].is_custom = lambda t: getattr(t, "custom", False)
    modules["transformer_engine.pytorch.custom_recipes"].__path__ = [str(recipes_dir)]
    return modules


@pytest.fixture(scope="session")
def te_reference():
    """TE's reference_nvfp4 module (bit-for-bit specification), or skip with the reason."""
    recipes_dir = TE_REFERENCE_DIR / "transformer_engine" / "pytorch" / "custom_recipes"
    if not (recipes_dir / "reference_nvfp4.py").exists():
        pytest.skip(f"TE's reference_nvfp4.py not found under {TE_REFERENCE_DIR} "
                    "(bash .ci/run unpacks it from the transformer-engine-cu13 wheel)")
    saved = {name: sys.modules.get(name) for name in list(sys.modules) if name.startswith("transformer_engine")}
    sys.modules.update(_stub_te_modules(recipes_dir))
    try:
        modules = {}
        for name in ("reference_utils", "gemm", "reference_nvfp4", "reference_current_scaling"):
            full = f"transformer_engine.pytorch.custom_recipes.{name}"
            spec = importlib.util.spec_from_file_location(full, recipes_dir / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
            modules[name] = module
    finally:
        for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})
    return types.SimpleNamespace(**modules)


@pytest.fixture(scope="session")
def te_recipes():
    """TE 2.20's `transformer_engine.common.recipe` module (its recipe dataclasses, fields and
    defaults), loaded from the wheel's file with the standard dataclass standing in for
    pydantic's; or skip with the reason."""
    path = TE_REFERENCE_DIR / "transformer_engine" / "common" / "recipe" / "__init__.py"
    if not path.exists():
        pytest.skip(f"TE's common/recipe/__init__.py not found under {TE_REFERENCE_DIR} "
                    "(bash .ci/run unpacks it from the transformer-engine-cu13 wheel)")
    import dataclasses
    pydantic = types.ModuleType("pydantic")
    pydantic.dataclasses = types.ModuleType("pydantic.dataclasses")
    pydantic.dataclasses.dataclass = dataclasses.dataclass
    saved = {name: sys.modules.get(name) for name in ("pydantic", "pydantic.dataclasses")}
    sys.modules.update({"pydantic": pydantic, "pydantic.dataclasses": pydantic.dataclasses})
    try:
        spec = importlib.util.spec_from_file_location("te_common_recipe", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["te_common_recipe"] = module  # dataclasses resolves string annotations there
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


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
    import asmae_minimal  # after sys.path has the repository
    base = ["--device", "cpu", "--model", "tiny", "--batch-size", "16", "--out-dir", str(tmp_path / "runs"),
            "--log-every", "2"]
    summary = asmae_minimal.main(base + (["--run-name", run_name] if run_name else []) + list(argv))
    return summary, tmp_path / "runs" / run_name if run_name else None


def metrics(run_dir: Path, timing=False):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines if timing else [{k: v for k, v in l.items() if k not in ("time_s", "img_per_s")} for l in lines]


def fails(capsys, argv, message):
    """main(argv) exits 2 with one line on stderr that holds `message`."""
    import asmae_minimal
    with pytest.raises(SystemExit) as exit_info:
        asmae_minimal.main(["--device", "cpu", "--model", "tiny", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def images(tmp_path):
    """A folder of 80 images in two classes: 72 train images, 4 steps of 16."""
    return write_image_folder(tmp_path / "images", classes=2, per_class=40)  # 72 train images: 4 steps of 16


def stop_after(monkeypatch, steps, sig=signal.SIGTERM):
    """Deliver a real signal to this process after `steps` optimizer steps."""
    import asmae_minimal
    real_step, count = asmae_minimal.TrainStep.__call__, [0]

    def step(self, *args):
        out = real_step(self, *args)
        count[0] += 1
        if count[0] == steps:
            os.kill(os.getpid(), sig)
        return out
    monkeypatch.setattr(asmae_minimal.TrainStep, "__call__", step)
