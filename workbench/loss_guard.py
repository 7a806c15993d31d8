"""Skip the optimizer steps whose loss or gradient norm is not finite, on the device (no host sync
a step), and stop a run after too many in a row: the train step's guard, saved in checkpoints."""
import torch


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
