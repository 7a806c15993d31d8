"""GEMM shape rules of Transformer Engine's recipes, and the row layout quantization reads."""
import torch

# {recipe name: (multiple for K and N, multiple for the token dim M)}. NVFP4: 16-element blocks
# along K, and along M for the wgrad copies; FP8: last dim % 16, product of leading dims % 8.
GEMM_MULTIPLES = {"nvfp4": (16, 16), "fp8": (16, 8)}


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous rows [prod(leading dims), last dim]. Block quantization reads 16
    consecutive elements of a row, so a non-contiguous operand is copied, never reinterpreted."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.is_contiguous() else x2d.contiguous()


def gemm_shape_error(recipe, m: int, k: int, n: int):
    """A message naming the dim of an M x K x N GEMM that breaks `recipe`'s multiples, or None."""
    if recipe is None:
        return None
    kn, mult_m = GEMM_MULTIPLES[recipe.name]
    for dim, size, multiple in (("in_features K", k, kn), ("out_features N", n, kn),
                                ("tokens per step M", m, mult_m)):
        if size % multiple:
            return (f"{dim} = {size} is not a multiple of {multiple}, "
                    f"which {recipe.name} GEMMs need (M={m}, K={k}, N={n})")
    return None
