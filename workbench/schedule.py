"""The one learning-rate schedule, MAE's (facebookresearch/mae util/lr_sched.py), for pretraining,
the linear probe and fine-tuning alike: linear warm-up, then a half-cycle cosine to 0, set every
step."""
import math


def warmup_cosine(epoch: float, warmup_epochs: float, epochs: float) -> float:
    """The fraction of the peak lr at `epoch` (fractional: steps done / steps an epoch)."""
    if epoch < warmup_epochs:
        return epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
