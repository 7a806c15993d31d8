"""Guards that turn silent shape, mask and loss trouble into clear errors."""
import torch

# TE's GEMM constraints: {precision: (multiple for K and N, multiple for the token dim M)}.
# NVFP4: 16-element blocks along K, and along M for the wgrad copies; FP8: last dim % 16,
# product of leading dims % 8.
GEMM_MULTIPLES = {"nvfp4": (16, 16), "fp8": (16, 8)}


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous rows [prod(leading dims), last dim]. Block quantization reads 16
    consecutive elements of a row, so a non-contiguous operand is copied, never reinterpreted."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.is_contiguous() else x2d.contiguous()


def require_contiguous(t: torch.Tensor, what: str) -> torch.Tensor:
    """Raise where a tensor is about to be viewed with a new shape but is not contiguous."""
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous before it is reshaped "
                         f"(shape {tuple(t.shape)}, stride {t.stride()})")
    return t


def gemm_shape_error(precision: str, m: int, k: int, n: int):
    """A message naming the dim that breaks the recipe's multiples, or None."""
    if precision not in GEMM_MULTIPLES:
        return None
    kn, mult_m = GEMM_MULTIPLES[precision]
    for dim, size, multiple in (("in_features K", k, kn), ("out_features N", n, kn),
                                ("tokens per step M", m, mult_m)):
        if size % multiple:
            return (f"{dim} = {size} is not a multiple of {multiple}, "
                    f"which {precision} GEMMs need (M={m}, K={k}, N={n})")
    return None


def check_mask(mask: torch.Tensor, batch: int, num_patches: int, num_masked: int) -> None:
    """MAE mask sanity: shape [B, L], binary, exactly `num_masked` ones per sample."""
    if tuple(mask.shape) != (batch, num_patches):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({batch}, {num_patches})")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask is not binary")
    per_sample = mask.sum(1)
    if not (per_sample == num_masked).all():
        raise ValueError(f"mask has {per_sample.min().item():.0f}..{per_sample.max().item():.0f} "
                         f"masked patches per sample, expected exactly {num_masked}")


class NonFiniteLossError(RuntimeError):
    pass


class LossGuard:
    """Skip optimizer steps whose loss or gradient norm is not finite, without a host sync.

    `update` returns a 0/1 device tensor for the fused optimizer's `found_inf` (the step is
    then a no-op); the counters live on the device and `check` reads them when the host syncs
    anyway (at log time), stopping the run after `max_consecutive` bad steps in a row.
    """

    def __init__(self, max_consecutive: int, device):
        self.max_consecutive = max_consecutive
        zero = torch.zeros((), device=device, dtype=torch.int64)
        self.skipped, self.streak, self.trigger_step = zero.clone(), zero.clone(), zero - 1

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor, step) -> torch.Tensor:
        """step: int or device tensor. The counters change in place (a CUDA graph replays this)."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.skipped.add_(bad)
        self.streak.add_(1).mul_(bad)
        first_trigger = (self.streak == self.max_consecutive) & (self.trigger_step < 0)
        self.trigger_step.copy_(torch.where(first_trigger, step - self.max_consecutive + 1, self.trigger_step))
        return bad.to(torch.float32)

    def skipped_steps(self) -> int:
        return int(self.skipped.item())

    def check(self) -> None:
        start = int(self.trigger_step.item())
        if start >= 0:
            raise NonFiniteLossError(
                f"loss or gradient was not finite at step {start} and the "
                f"{self.max_consecutive - 1} steps after it; those steps were skipped, "
                f"so the weights are those of step {start - 1}")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.cpu(), "streak": self.streak.cpu(),
                "trigger_step": self.trigger_step.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("skipped", "streak", "trigger_step"):
            setattr(self, key, state[key].to(self.skipped.device))
