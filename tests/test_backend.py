"""Backend selection (TE or emulation) by nvfp4.Precision, its error messages, and checkpoint
names across backends."""
import types

import pytest
import torch

from nvfp4 import Precision, te_backend
from nvfp4.linear import LayerNormLinear, LayerNormMLP, Linear
from workbench.files import load_model_state

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
NO_TE = lambda: (None, "Transformer Engine does not import (ModuleNotFoundError: No module named 'transformer_engine')")
FAKE_TE = lambda: (types.SimpleNamespace(__version__="2.20.2"), None)


def select_backend(requested, precision, device, te_import):
    """(backend, its log line) of the Precision that resolves on this device."""
    resolved = Precision.resolve(precision, device, backend=requested, amp=False, te_import=te_import)
    return resolved.backend, resolved.describe()[0]


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be on a GPU of a given compute capability."""
    def set_capability(major, minor, name="NVIDIA Test GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return set_capability


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_auto_falls_back_to_emulation_and_says_why(precision, gpu):
    backend, line = select_backend("auto", precision, CPU, NO_TE)
    assert backend == "emulated" and f"emulated {precision.upper()}" in line and "does not import" in line
    backend, line = select_backend("auto", precision, CPU, FAKE_TE)
    assert backend == "emulated" and "needs a CUDA GPU" in line
    gpu(9, 0, "NVIDIA H100 80GB HBM3")
    backend, line = select_backend("auto", precision, CUDA, FAKE_TE)
    if precision == "nvfp4":
        assert backend == "emulated" and "compute capability >= 10.0; NVIDIA H100 80GB HBM3 is 9.0" in line
    else:
        assert backend == "te" and "Float8CurrentScaling" in line


def test_auto_picks_te_where_the_gpu_runs_the_recipe(gpu):
    gpu(10, 0)
    assert select_backend("auto", "nvfp4", CUDA, FAKE_TE)[0] == "te"
    gpu(8, 9)
    assert select_backend("auto", "fp8", CUDA, FAKE_TE)[0] == "te"
    assert select_backend("auto", "nvfp4", CUDA, FAKE_TE)[0] == "emulated"
    gpu(8, 0)
    assert select_backend("auto", "fp8", CUDA, FAKE_TE)[0] == "emulated"


def test_auto_runs_fp8_gemms_on_fp8_tensor_cores_without_te(gpu):
    """No TE on an sm_89+ GPU: auto keeps TE's recipe (and its backward_override) and runs the
    GEMMs with torch._scaled_mm; emulated and older GPUs multiply on bf16 tensor cores."""
    from nvfp4 import FP8Recipe
    gpu(9, 0)
    native = Precision.resolve("fp8", CUDA, amp=False, recipe=FP8Recipe(backward_override="dequantized"), te_import=NO_TE)
    assert native.recipe.native and native.recipe.backward_override == "dequantized" and native.backend == "emulated"
    assert "torch._scaled_mm" in native.describe()[0] and "does not import" in native.describe()[0]
    assert not Precision.resolve("fp8", CUDA, backend="emulated", amp=False, te_import=NO_TE).recipe.native
    gpu(8, 0)
    old = Precision.resolve("fp8", CUDA, amp=False, te_import=NO_TE)
    assert not old.recipe.native and "emulated FP8" in old.describe()[0]
    assert not Precision.resolve("fp8", CPU, amp=False, te_import=NO_TE).recipe.native


def test_high_precision_and_emulated_never_need_te():
    for precision in ("fp32", "bf16"):
        assert select_backend("auto", precision, CPU, NO_TE) == ("emulated", f"backend: PyTorch {precision}")
    assert select_backend("emulated", "nvfp4", CPU, FAKE_TE)[0] == "emulated"


def test_backend_te_errors_name_what_is_missing(gpu):
    with pytest.raises(te_backend.BackendError, match="does not import") as missing:
        select_backend("te", "nvfp4", CPU, NO_TE)
    with pytest.raises(te_backend.BackendError, match="needs a CUDA GPU") as elsewhere:
        select_backend("te", "fp8", CPU, FAKE_TE)
    assert not missing.value.te_imports and elsewhere.value.te_imports and "--" not in str(elsewhere.value)
    gpu(9, 0)
    with pytest.raises(te_backend.BackendError, match=r"compute capability >= 10\.0.*is 9\.0"):
        select_backend("te", "nvfp4", CUDA, FAKE_TE)


def test_parameter_names_match_transformer_engine():
    """TE 2.20 registers these names (module/linear.py, layernorm_linear.py, layernorm_mlp.py), so
    checkpoints load on either backend (TE adds only `_extra_state` entries, which are skipped)."""
    assert set(dict(Linear(16, 32).named_parameters())) == {"weight", "bias"}
    assert set(dict(LayerNormLinear(16, 32).named_parameters())) == {
        "layer_norm_weight", "layer_norm_bias", "weight", "bias"}
    assert set(dict(LayerNormMLP(16, 64).named_parameters())) == {
        "layer_norm_weight", "layer_norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}


def test_state_dict_with_te_extra_state_loads_into_the_pytorch_model():
    import asmae_minimal
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--model", "tiny", "--dataset", "fake"])
    model = asmae_minimal.build_model(config, CPU, config.optim.batch_size)[0]
    state = dict(model.state_dict())
    state["blocks.0.mlp._extra_state"] = torch.empty(0)  # what a TE module adds
    load_model_state(model, state, "a TE checkpoint")


def test_te_model_trains_with_its_recipe():
    te, problem = te_backend.import_te()
    if te is None:
        pytest.skip(problem)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (10, 0):
        pytest.skip("TE's NVFP4 recipe needs a GPU of compute capability >= 10.0")
    import asmae_minimal
    _, config = asmae_minimal.parse_config(["--model", "tiny", "--dataset", "fake", "--precision", "nvfp4",
                                            "--backend", "te", "--batch-size", "32"])
    model, precision = asmae_minimal.build_model(config, torch.device(config.run.device), 32)
    assert precision.backend == "te" and isinstance(model.blocks[0].mlp, te.LayerNormMLP)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs, noise = torch.randn(32, 3, 32, 32, device="cuda"), torch.rand(32, 64, device="cuda")
    losses = []
    for _ in range(5):
        with precision.autocast():  # bf16 autocast and TE's, with its NVFP4BlockScaling recipe
            loss = model(imgs, noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_te_backend_refuses_backward_override(gpu):
    """TE 2.20's LayerNormMLP asserts that the recipe's backward_override is None
    (pytorch/module/layernorm_mlp.py), and every block has one: backend te refuses it up front,
    auto runs the emulation and says why."""
    from nvfp4 import NVFP4Recipe, FP8Recipe
    gpu(10, 0, "NVIDIA B200")
    for name, recipe in (("nvfp4", NVFP4Recipe(backward_override="high_precision")),
                         ("fp8", FP8Recipe(backward_override="dequantized"))):
        with pytest.raises(te_backend.BackendError, match="LayerNormMLP has no backward_override"):
            Precision.resolve(name, CUDA, backend="te", amp=False, recipe=recipe, te_import=FAKE_TE)
        auto = Precision.resolve(name, CUDA, backend="auto", amp=False, recipe=recipe, te_import=FAKE_TE)
        assert auto.backend == "emulated" and "LayerNormMLP" in auto.describe()[0]
        assert Precision.resolve(name, CUDA, backend="te", amp=False, te_import=FAKE_TE).backend == "te"
