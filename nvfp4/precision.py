"""A run's numerics in one object: the GEMM format of its linear layers, the backend that runs
it (Transformer Engine or the emulation) and why, and the autocast dtype of its activations."""
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from . import te_backend
from .formats import FP8Recipe, NativeFP8Recipe, NVFP4Recipe
from .linear import LayerFactory, Recipe, drop_quantization

PRECISIONS = ("fp32", "bf16", "fp8", "nvfp4")
DEFAULT_RECIPES = {"nvfp4": NVFP4Recipe(), "fp8": FP8Recipe()}


@dataclass(frozen=True)
class Precision:
    """name: fp32 | bf16 | fp8 | nvfp4, the GEMM format of the linear layers; recipe: its
    quantization recipe (None for fp32/bf16); backend: "te" (Transformer Engine's modules
    under TE's autocast) or "emulated" (PyTorch modules, the emulation for fp8/nvfp4);
    backend_name and reason say which runs and why; amp_dtype: the autocast dtype of the
    activations, None without AMP. Build it with `resolve`."""
    name: str
    recipe: Optional[Recipe]
    backend: str
    backend_name: str
    reason: Optional[str]
    amp_dtype: Optional[torch.dtype]
    device_type: str
    keep_high_precision: tuple = ()

    @classmethod
    def resolve(cls, name: str, device: torch.device, backend: str = "auto", amp: bool = True,
                recipe: Optional[Recipe] = None, keep_high_precision=(), te_import=te_backend.import_te):
        """backend: auto (TE where it imports and the device runs the recipe, else the
        emulation, whose FP8 GEMMs run on FP8 tensor cores where the GPU has them), te (raises
        BackendError where TE cannot run it) or emulated. recipe: the quantization recipe of
        fp8/nvfp4 (default: TE's defaults). AMP runs in bf16 where the device has it, else in fp16
        (which needs a GradScaler)."""
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        recipe = recipe or DEFAULT_RECIPES.get(name)
        if recipe is not None and recipe.name != name:
            raise ValueError(f"a {recipe.name} recipe cannot run precision {name}")
        kind, label, reason = _select_backend(backend, name, recipe, device, te_import)
        if name == "fp8" and kind == "emulated" and backend == "auto" and native_fp8(device):
            recipe = NativeFP8Recipe(**asdict(recipe))
            label = "FP8 GEMMs on FP8 tensor cores (torch._scaled_mm), TE's current scaling in PyTorch"
        amp_dtype = None
        if amp:
            bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
            amp_dtype = torch.bfloat16 if bf16 else torch.float16
        return cls(name, recipe, kind, label, reason, amp_dtype, device.type, tuple(keep_high_precision))

    def layers(self) -> LayerFactory:
        """The factory of the model's linear layers in this precision."""
        return LayerFactory(self.recipe, self.keep_high_precision, self.backend)

    def unquantize(self, model: torch.nn.Module) -> "Precision":
        """Switch `model`'s quantized linear layers to high precision (a precision schedule's
        switch, or fine-tuning unquantized), and return this precision after it: no recipe, so no
        TE autocast; the layers then run in the AMP dtype, emulated and TE's alike."""
        drop_quantization(model)
        return replace(self, recipe=None)

    @contextmanager
    def autocast(self):
        """The context of a forward pass: torch's autocast with AMP (no cached casts, which a
        CUDA graph would freeze), TE's autocast with its recipe on the TE backend."""
        amp = (torch.autocast(self.device_type, dtype=self.amp_dtype, cache_enabled=False)
               if self.amp_dtype else nullcontext())
        te = te_backend.autocast(self.recipe) if self.backend == "te" and self.recipe else nullcontext()
        with amp, te:
            yield

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def describe(self, gemms=()) -> list:
        """Log lines: the backend and why; for fp8/nvfp4 which of `gemms` (LayerFactory.gemms)
        are quantized and the recipe's switches."""
        lines = [f"backend: {self.backend_name}" + (f" ({self.reason})" if self.reason else "")]
        if self.recipe is None:
            return lines
        quantized = [name for name, *_, q in gemms if q]
        kept = [name for name, *_, q in gemms if not q]
        lines.append(f"{self.name}: {len(quantized)} of {len(gemms)} GEMM layers quantized "
                     f"({compact_names(quantized)}); high precision: {compact_names(kept) or 'none'}")
        if isinstance(self.recipe, NVFP4Recipe):
            lines.append(self.recipe.describe())
        return lines


def native_fp8(device: torch.device) -> bool:
    """Whether torch._scaled_mm multiplies FP8 on this device's tensor cores (sm_89 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _select_backend(requested: str, name: str, recipe, device, te_import):
    """(kind, display name, reason or None); raises BackendError when backend te cannot run."""
    quantized = recipe is not None
    emulated = f"emulated {name.upper()} in PyTorch" if quantized else f"PyTorch {name}"
    if requested == "emulated" or (requested == "auto" and not quantized):
        return "emulated", emulated, "as asked" if requested == "emulated" else None
    if requested not in ("auto", "te"):
        raise ValueError(f"backend must be auto, te or emulated, got {requested!r}")
    te, problem = te_import()
    problem = problem or te_backend.device_problem(name, device) or te_backend.recipe_problem(recipe)
    if problem is None:
        recipe = te_backend.RECIPE_NAME.get(name, "no quantization recipe")
        return "te", f"Transformer Engine {getattr(te, '__version__', '?')}, {recipe}", None
    if requested == "te":
        raise te_backend.BackendError(problem, te_imports=te is not None)
    return "emulated", emulated, problem


def compact_names(names) -> str:
    """'blocks.0.mlp.fc1', 'blocks.1.mlp.fc1' -> 'blocks.*.mlp.fc1' (order kept)."""
    out = []
    for name in names:
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        if pattern not in out:
            out.append(pattern)
    return ", ".join(out)
