"""The command line around the script's frozen Config: a flag per dataclass field (its help, its
type, --x / --no-x pairs), one-line argparse errors, number types that refuse inf, NaN and
non-ASCII digits, the device, and Command: what to run (train, resume, eval, compare, benchmark)."""
import argparse
import dataclasses
import math
import netrc
import os
import re
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

import torch

from workbench.errors import UsageError


def flag(default, help: str, **argparse_kwargs):
    """A config field that is a command-line flag: --field-name (or argparse_kwargs' `flag`), its
    type from the annotation, `help` for --help. An Optional[bool] field is the pair --x / --no-x
    (`off`: the help of --no-x), None until the CLI fills its per-device default."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass(frozen=True)
class Command:
    """What to do with the Config: train (the default), resume, evaluate, compare or benchmark."""
    resume: Optional[str] = flag(None, "continue from a checkpoint file or a run folder", metavar="PATH")
    eval: Optional[str] = flag(None, "evaluate a checkpoint (held-out loss, PSNR, linear probe, kNN) and exit",
                               metavar="CKPT")
    compare: Optional[str] = flag(None, "train the same config in each variant: a precision, then :switch or "
                                        ":switch=value of the precision flags without -- (e.g. "
                                        "bf16,nvfp4,nvfp4:no-rht,nvfp4:high-precision-from=0.9), and write a "
                                        "report", metavar="VARIANTS")
    seeds: Optional[str] = flag(None, "with --compare: train every variant with each of these seeds (e.g. 0,1,2; "
                                      "default: --seed) and report mean, std and paired 95%% CIs", metavar="SEEDS")
    finetune_epochs: Optional[int] = flag(None, "with --eval or --compare: fine-tune the encoder and a linear head on "
                                                "the labelled training split for N epochs and report held-out top-1 "
                                                "(default: 0 with --eval, 5 with --compare)", metavar="N")
    finetune_precision: str = flag("bf16", "bf16: fine-tune with the linear layers unquantized (in the AMP dtype); "
                                           "pretrain: in the pretraining precision", choices=["bf16", "pretrain"])
    benchmark: Optional[int] = flag(None, "time N steps after warm-up and exit", metavar="N")
    benchmark_synthetic: bool = flag(False, "with --benchmark: a fixed batch on the device, model and optimizer only")
    profile: bool = flag(False, "with --benchmark: profile 20 more steps (torch.profiler), print CUDA time per step "
                                "by kernel group (GEMM, quantize, attention, ...) and the top kernels, and write a "
                                "Chrome trace to the out dir")
    variants: tuple = ()  # --compare: one Variant (label, validated Config) each
    sweep_seeds: tuple = ()  # --compare: the seeds of --seeds (or --seed)
    explicit: frozenset = frozenset()  # the dests given on the command line (a resumed run applies these)

    @property
    def mode(self) -> str:
        return next(iter(self.modes()), "train")

    def modes(self) -> list:
        """The modes given (they exclude each other), in the order `mode` takes them."""
        return [m for m in ("eval", "benchmark", "compare", "resume") if getattr(self, m) is not None]


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, but not None/False ones (0 is shown)
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def name_patterns(text: str) -> tuple:
    """'a, b.*' -> ('a', 'b.*'); '' -> ()."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def number(text: str) -> float:
    """argparse type of the float flags: a finite number in ASCII digits (inf, nan and, say,
    full-width digits, which float() would take, are refused)."""
    value = float(text) if text.isascii() else math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"takes a finite number, got {text!r}")
    return value


def whole_number(text: str) -> int:
    """argparse type of the integer flags: ASCII digits (int() would read '１' as 1)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}")
    return int(text)


def add_flag(group, f: dataclasses.Field, with_defaults: bool):
    kwargs = dict(f.metadata)
    name, off = kwargs.pop("flag", "--" + f.name.replace("_", "-")), kwargs.pop("off", None)
    value_type = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
    if with_defaults:
        kwargs["default"] = ",".join(f.default) if value_type is tuple else f.default  # a string default is parsed
    if off is not None:  # --x / --no-x, either or neither
        pair = group.add_mutually_exclusive_group()
        pair.add_argument(name, dest=f.name, action="store_const", const=True, **kwargs)
        pair.add_argument("--no-" + name[2:], dest=f.name, action="store_const", const=False, help=off)
    elif value_type is bool:
        group.add_argument(name, dest=f.name, action="store_true", **kwargs)
    else:
        types = {tuple: name_patterns, float: number, int: whole_number}
        group.add_argument(name, dest=f.name, type=types.get(value_type, value_type), **kwargs)


def wandb_can_log() -> bool:
    """W&B logs offline (WANDB_MODE), or has an API key: in the environment or from `wandb login`
    (its entry in ~/.netrc)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def device_memory(device: str) -> int:
    """Bytes of memory of the GPU, or of the host."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"--device {name}: the CPU is one device; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
    return device

