import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Where .ci/run unpacks `transformer_engine/pytorch/custom_recipes/` from TE's wheel.
TE_REFERENCE_DIR = Path(os.environ.get("TE_REFERENCE_DIR", REPO / ".te_reference"))
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_python(code: str, env=None) -> str:
    """Run code in a fresh interpreter (e.g. with TRITON_INTERPRET=1, which Triton reads at its
    import); its stdout, or fail with the end of its stderr."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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
