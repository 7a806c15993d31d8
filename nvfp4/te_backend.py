"""Transformer Engine adapter: whether TE runs a recipe here, and TE's modules, recipes and autocast.

TE's NVFP4 GEMMs need compute capability >= 10.0 (Blackwell), its FP8 GEMMs >= 8.9 (Ada,
Hopper). Everywhere else the emulation in `nvfp4.linear` runs the same recipe in PyTorch.
"""
from dataclasses import fields
from functools import lru_cache

from typing import Optional

import torch

from .formats import FP8Recipe, NVFP4Recipe

NEEDED_CAPABILITY = {"nvfp4": (10, 0), "fp8": (8, 9)}
RECIPE_NAME = {"nvfp4": "NVFP4BlockScaling", "fp8": "Float8CurrentScaling(HYBRID)"}


class BackendError(ValueError):
    """Transformer Engine cannot run the recipe here: the message says why; te_imports, whether
    TE itself imports (the fix is then another device or the emulation, else installing TE)."""

    def __init__(self, problem: str, te_imports: bool):
        super().__init__(problem)
        self.te_imports = te_imports


def import_te():
    """(transformer_engine.pytorch, None), or (None, why it did not import)."""
    try:
        import transformer_engine.pytorch as te
        return te, None
    except ModuleNotFoundError:
        return None, "Transformer Engine is not installed"
    except Exception as error:  # TE raises OSError/RuntimeError too when CUDA libs are missing
        return None, f"Transformer Engine does not import ({type(error).__name__}: {error})"


def device_problem(precision: str, device: torch.device):
    """Why this device cannot run TE's `precision` GEMMs, or None."""
    if device.type != "cuda":
        return f"Transformer Engine needs a CUDA GPU; this run is on {device.type}"
    needed = NEEDED_CAPABILITY.get(precision)
    capability = torch.cuda.get_device_capability(device)
    if needed and capability < needed:
        return (f"TE's {precision.upper()} GEMMs need compute capability >= {needed[0]}.{needed[1]}; "
                f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    return None


def recipe_problem(recipe) -> Optional[str]:
    """Why TE's modules cannot run `recipe` in this model, or None: TE 2.20's LayerNormMLP asserts
    that the recipe's backward_override is None (module/layernorm_mlp.py), and every block of
    the model has one."""
    if getattr(recipe, "backward_override", None) is not None:
        return (f"TE 2.20's LayerNormMLP has no backward_override (it asserts it is None; the recipe "
                f"asks for {recipe.backward_override!r})")
    return None


def make_module(kind: str, in_features: int, out_features: int, eps: float):
    """A TE module with the parameter names of the PyTorch modules in nvfp4.linear."""
    te, problem = import_te()
    if te is None:
        raise BackendError(problem)
    if kind == "linear":
        return te.Linear(in_features, out_features, bias=True, params_dtype=torch.float32)
    if kind == "norm_linear":
        return te.LayerNormLinear(in_features, out_features, eps=eps, bias=True,
                                  params_dtype=torch.float32)
    if kind == "norm_mlp":
        return te.LayerNormMLP(in_features, out_features, eps=eps, bias=True, activation="gelu",
                               params_dtype=torch.float32)
    raise ValueError(f"unknown TE module kind {kind!r}")


@lru_cache(maxsize=None)
def te_recipe(recipe):
    """TE's recipe object for our NVFP4Recipe / FP8Recipe (frozen, so hashable), built once: the
    train step enters TE's autocast every step."""
    from transformer_engine.common.recipe import Float8CurrentScaling, Format, NVFP4BlockScaling
    if isinstance(recipe, NVFP4Recipe):  # the same fields under the same names
        return NVFP4BlockScaling(**{f.name: getattr(recipe, f.name) for f in fields(recipe)})
    if isinstance(recipe, FP8Recipe):
        return Float8CurrentScaling(fp8_format=Format.HYBRID, backward_override=recipe.backward_override)
    raise ValueError(f"no TE recipe for {recipe!r}")


def autocast(recipe):
    """TE's autocast (TE 2.20: `te.autocast(enabled, recipe=...)`) around a forward pass in `recipe`."""
    te, _ = import_te()
    return te.autocast(enabled=True, recipe=te_recipe(recipe))
