"""The command line around the script's frozen Config: a flag per dataclass field (its help, its
type, --x / --no-x pairs), one-line argparse errors, number types that refuse inf, NaN and
non-ASCII digits, the device, Command (what to run: train, resume, eval, compare, benchmark), and
argv -> (Command, Config): parsed, per-device defaults filled, validated once; --compare's
variants; a resumed run's changes."""
import argparse
import dataclasses
import importlib.util
import math
import netrc
import os
import re
import typing
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional

import torch

import nvfp4
from workbench.errors import UsageError
from workbench.files import check_run_name


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

# ---- argv -> the script's Config. `config_cls` is the script's Config class: its SECTIONS (section
# name -> frozen dataclass of flags) and PRESETS (the model sizes) say what there is to parse.

COMPARE_FINETUNE_EPOCHS = 5  # --compare's default fine-tuning evaluation (where the data has labels)
# A resumed run must rebuild the same model on the same data.
RESUME_CONFLICTS = ("preset", "img_size", "patch_size", "precision", "dataset", "norm_pix_loss")
# The precision section's switches of one format: of NVFP4's recipe, of any quantized precision.
NVFP4_ONLY = ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization", "row_scaled_activation",
              "nvfp4_4over6", "nvfp4_4over6_e4m3_use_256", "nvfp4_4over6_err_mode", "fp4_stats")
QUANTIZED_ONLY = ("backward_override", "high_precision_from")


def precision_defaults(config_cls) -> dict:
    return {f.name: f.default for f in fields(config_cls.SECTIONS["precision"])}


def flag_of(config_cls, name: str) -> str:
    """The command-line flag of a config field."""
    f = next(f for cls in config_cls.SECTIONS.values() for f in fields(cls) if f.name == name)
    return f.metadata.get("flag", "--" + name.replace("_", "-"))


def listed(flags: list) -> str:
    """'--a applies' or '--a, --b apply'."""
    return f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def switches_set(config_cls, values, names) -> list:
    """The flags among `names` whose precision-section value (values: the parsed flags, or the
    section) is not the default."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    defaults = precision_defaults(config_cls)
    return [flag_of(config_cls, name) for name in names if get(name) != defaults[name]]


def build_parser(config_cls, with_defaults: bool = True, description: Optional[str] = None) -> argparse.ArgumentParser:
    """The CLI: one group per Config section (and the Command), one flag per field with a help.
    with_defaults=False leaves the flags not given out of the namespace (to see what was)."""
    p = ArgumentParser(prog="asmae_minimal.py", description=description, formatter_class=HelpFormatter,
                       argument_default=None if with_defaults else argparse.SUPPRESS)
    for title, cls in (*config_cls.SECTIONS.items(), ("what to run", Command)):
        group = p.add_argument_group(title)
        for f in fields(cls):
            if "help" in f.metadata:
                add_flag(group, f, with_defaults)
    return p


def parse_config(argv, config_cls, check_model, description: Optional[str] = None) -> tuple:
    """argv -> (Command, Config), parsed and resolved once. The Config is validated, and for
    --compare Command.variants holds one validated Config per precision (the first is returned
    too), whose model check_model(config) builds (its layer patterns, GEMM shapes) before the
    first cell trains; for --resume and --eval, resume_config merges the flags given into the
    checkpoint's Config and validates that."""
    ns = vars(build_parser(config_cls, description=description).parse_args(argv))
    explicit = frozenset(vars(build_parser(config_cls, with_defaults=False).parse_args(argv)))
    command = Command(**{f.name: ns[f.name] for f in fields(Command) if f.name in ns}, explicit=explicit)
    modes = command.modes()
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1]} do not go together")
    if command.benchmark is not None and command.benchmark <= 0:
        raise UsageError(f"--benchmark must be positive, got {command.benchmark}")
    if command.benchmark_synthetic and command.benchmark is None:
        raise UsageError("--benchmark-synthetic needs --benchmark N")
    if command.profile and command.benchmark is None:
        raise UsageError("--profile needs --benchmark N")
    if command.seeds is not None and command.compare is None:
        raise UsageError("--seeds needs --compare (a single run takes --seed)")
    finetune_given = {"finetune_epochs", "finetune_precision"} & explicit
    if finetune_given and command.mode not in ("eval", "compare"):
        raise UsageError(f"--{sorted(finetune_given)[0].replace('_', '-')} goes with --eval or --compare")
    if command.finetune_epochs is not None and command.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs must be >= 0, got {command.finetune_epochs}")
    if command.finetune_epochs is None:
        command = dataclasses.replace(command, finetune_epochs=COMPARE_FINETUNE_EPOCHS if command.mode == "compare" else 0)
    device = resolve_device(ns["device"])
    if command.mode in ("resume", "eval"):
        return command, resolve_config(ns, ns["precision"], device, config_cls, explicit)
    if command.mode != "compare":
        return command, validate(resolve_config(ns, ns["precision"], device, config_cls, explicit))
    labels = split_variants(command.compare)
    if not labels or len(set(labels)) < len(labels):
        raise UsageError(f"--compare takes a comma-separated list of distinct variants (a precision from "
                         f"{', '.join(nvfp4.PRECISIONS)}, then :switch or :switch=value, e.g. nvfp4:no-rht), "
                         f"got {command.compare!r}")
    precisions = [label.split(":")[0] for label in labels]
    if "nvfp4" not in precisions and switches_set(config_cls, ns, NVFP4_ONLY):
        raise UsageError(f"{listed(switches_set(config_cls, ns, NVFP4_ONLY))} to nvfp4, which --compare does not "
                         f"list")
    seeds = parse_seeds(command.seeds, ns["seed"])
    variants = tuple(Variant(label, parse_variant(label, ns, device, explicit, config_cls, check_model))
                     for label in labels)
    for i, (label, config) in enumerate(variants):
        same = next((other for other, c in variants[:i] if c == config), None)
        if same is not None:
            raise UsageError(f"--compare variants {same!r} and {label!r} are the same configuration; drop one")
    return dataclasses.replace(command, variants=variants, sweep_seeds=seeds), variants[0].config


def parse_variant(label: str, ns: dict, device: torch.device, explicit, config_cls, check_model):
    """'nvfp4:no-rht:nvfp4-4over6=all' -> the Config of precision nvfp4 with those flags (any flag
    of the precision section but --precision, named without --) on top of the command line's."""
    precision, *switches = label.split(":")
    if precision not in nvfp4.PRECISIONS:
        raise UsageError(f"--compare variant {label!r}: {precision!r} is not a precision ({', '.join(nvfp4.PRECISIONS)})")
    allowed = {flag_of(config_cls, f.name) for f in fields(config_cls.SECTIONS["precision"])
               if f.name != "precision"} | {"--no-amp"}
    argv = []
    for switch in switches:
        key, has_value, value = switch.partition("=")
        if "--" + key not in allowed:
            raise UsageError(f"--compare variant {label!r}: {key!r} is not a precision switch (one of "
                             f"{', '.join(sorted(k[2:] for k in allowed))})")
        argv += ["--" + key] + ([value] if has_value else [])
    parser = build_parser(config_cls, with_defaults=False)

    def error(message):
        raise UsageError(f"--compare variant {label!r}: {message}")
    parser.error = error
    given = vars(parser.parse_args(argv))
    try:
        config = validate(resolve_config({**variant_flags(ns, precision, config_cls), **given}, precision, device,
                                         config_cls, explicit | set(given)))
        check_model(config)
        return config
    except UsageError as problem:
        raise UsageError(f"--compare variant {label!r}: {problem}") from None


def variant_flags(ns: dict, precision: str, config_cls) -> dict:
    """The flags of one --compare precision: bf16 always runs under AMP and fp32 without (as
    their own defaults), the NVFP4 switches apply to nvfp4 alone, the quantized ones to fp8 and
    nvfp4."""
    reset = (() if precision == "nvfp4" else NVFP4_ONLY) + (QUANTIZED_ONLY if precision in ("bf16", "fp32") else ())
    ns = dict(ns, amp=None) if precision in ("bf16", "fp32") else ns
    defaults = precision_defaults(config_cls)
    return dict(ns, **{key: defaults[key] for key in reset})


def resolve_config(ns: dict, precision: Optional[str], device: torch.device, config_cls, explicit=frozenset()):
    """One run's Config from the parsed flags, with the per-device defaults filled: AMP and
    compile on GPUs, bf16 with AMP (else fp32), batch 256 on GPUs (32 on CPUs), and the recipe
    switches that TE 2.20 takes from NVTE_* environment variables, where no flag (`explicit`:
    the dests given) set them."""
    on_gpu = device.type == "cuda"
    amp = ns["amp"]
    precision = precision or ("bf16" if (on_gpu if amp is None else amp) else "fp32")
    amp = {"bf16": True, "fp32": False}.get(precision, on_gpu) if amp is None else amp
    batch = ns["batch_size"] if ns["batch_size"] is not None else (256 if on_gpu else 32)
    try:
        environment = {key: found for key, found in nvfp4.recipe_environment(precision).items() if key not in explicit}
    except ValueError as error:
        raise UsageError(str(error)) from None

    def section(cls, **resolved):
        return cls(**{**{f.name: ns[f.name] for f in fields(cls) if f.name in ns}, **resolved})

    sections = config_cls.SECTIONS
    return config_cls(
        data=section(sections["data"]), model=section(sections["model"], **config_cls.PRESETS[ns["preset"]]),
        precision=section(sections["precision"], precision=precision, amp=amp,
                          **{key: value for key, (value, _) in environment.items()},
                          from_environment=tuple(source for _, source in environment.values())),
        optim=section(sections["optim"], batch_size=batch),
        run=section(sections["run"], device=str(device), compile=on_gpu if ns["compile"] is None else ns["compile"]))


def validate(config):
    """Every check of a run's Config, in one place; raises UsageError naming the flag."""
    d, m, p, o, r = config.data, config.model, config.precision, config.optim, config.run
    switches = lambda names: switches_set(type(config), p, names)
    world = int(os.environ.get("WORLD_SIZE", 1))
    checks = [
        (o.epochs > 0, f"--epochs must be positive, got {o.epochs}"),
        (o.batch_size > 0, f"--batch-size must be positive, got {o.batch_size}"),
        (o.batch_size % world == 0, f"--batch-size {o.batch_size} does not split over {world} processes"),
        (0 < m.mask_ratio < 1, f"--mask-ratio must be in (0, 1), got {m.mask_ratio}"),
        (m.patch_size > 0 and m.img_size > 0, "--img-size and --patch-size must be positive"),
        (m.patch_size <= 0 or m.img_size % m.patch_size == 0,  # positivity is reported above
         f"--img-size {m.img_size} is not divisible by --patch-size {m.patch_size}"),
        (o.blr > 0, f"--blr must be positive, got {o.blr}"),
        (o.lr is None or o.lr > 0, f"--lr must be positive, got {o.lr}"),
        (o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {o.warmup_epochs}"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
        (0 <= d.num_workers <= 4 * (os.cpu_count() or 1),
         f"--num-workers must be in [0, {4 * (os.cpu_count() or 1)}] (4 per core here), got {d.num_workers}"),
        (r.out_dir.strip() != "", "--out-dir is empty; name a folder (the default is runs)"),
        (r.log_every > 0 and r.save_every > 0 and r.keep_last > 0 and r.max_bad_steps > 0,
         "--log-every, --save-every, --keep-last and --max-bad-steps must be positive"),
        (p.precision != "bf16" or p.amp, "--precision bf16 runs under AMP; drop --no-amp or use --precision fp32"),
        (p.precision != "fp32" or not p.amp, "--precision fp32 runs without AMP; drop --amp or use --precision bf16"),
        (not switches(NVFP4_ONLY) or p.precision == "nvfp4", f"{listed(switches(NVFP4_ONLY))} to --precision nvfp4 only"),
        (not switches(QUANTIZED_ONLY) or p.precision in ("fp8", "nvfp4"),
         f"{listed(switches(QUANTIZED_ONLY))} to --precision fp8 and nvfp4 only"),
        (p.high_precision_from is None or 0 < p.high_precision_from < 1,
         f"--high-precision-from must be in (0, 1), got {p.high_precision_from}"),
        (not (p.nvfp4_4over6 in ("activations", "all") and not p.disable_rht),
         f"--nvfp4-4over6 {p.nvfp4_4over6} needs --no-rht: the input's quantizer applies RHT, and TE 2.20 has no "
         f"RHT + 4over6 quantization"),
        (0 <= r.seed < 2 ** 32, f"--seed must be in [0, 2^32), got {r.seed}"),
        (not r.use_wandb or importlib.util.find_spec("wandb") is not None,
         "--use-wandb: wandb is not installed (pip install wandb), or drop --use-wandb"),
        (not r.use_wandb or wandb_can_log(), "--use-wandb: not logged in to W&B (set WANDB_API_KEY or run "
                                             "`wandb login`), or log offline with WANDB_MODE=offline"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if m.num_patches < 2:
        raise UsageError(f"--img-size {m.img_size} / --patch-size {m.patch_size} gives {m.num_patches} patch; "
                         f"MAE masks some patches and sees the rest: take a smaller --patch-size")
    if not 0 < m.num_visible < m.num_patches:
        raise UsageError(f"--mask-ratio {m.mask_ratio} leaves {m.num_visible} of {m.num_patches} patches visible")
    batch_bytes = 4 * (o.batch_size // world) * (3 * m.img_size ** 2 + m.num_patches)  # a lower bound
    on_gpu = r.device.startswith("cuda")
    if batch_bytes > device_memory(r.device):
        raise UsageError(f"--img-size {m.img_size} at --batch-size {o.batch_size}: one batch's images and masking "
                         f"noise alone take {batch_bytes / 2 ** 30:,.1f} GiB in fp32, more than the "
                         f"{device_memory(r.device) / 2 ** 30:,.1f} GiB of {'this GPU' if on_gpu else 'this machine'}")
    if r.run_name is not None:
        check_run_name(r.run_name, r.out_dir)
    return config


def resume_config(saved, cli, explicit) -> tuple:
    """A checkpoint's Config with the flags given on this command line applied (the device
    always: a run may move), and the list of changes. Changes to the model, the data or the
    precision are refused, and so are other run folders: the checkpoint's is the run's."""
    flags = {a.dest: a.option_strings[0] for a in build_parser(type(saved))._actions if a.option_strings}
    changes, updates = [], {"device": cli.run.device}
    for key in sorted(explicit - {f.name for f in fields(Command)}):
        old, new = saved.get(key), cli.get(key)
        if old == new:
            continue
        name = flags[key][2:].replace("-", "_")  # as the flag reads: precision, not the field's name
        if key in RESUME_CONFLICTS:
            raise UsageError(f"{flags[key]} {new} conflicts with the checkpoint ({name}={old}); a resumed run "
                             f"keeps its model, data and precision")
        if key in ("out_dir", "run_name", "overwrite"):
            raise UsageError(f"{flags[key]}: --resume and --eval stay in the checkpoint's own folder; drop "
                             f"{flags[key]}")
        changes.append(f"{name} {old} -> {new}")
        updates[key] = new
    return validate(saved.replace(**updates)), changes


def split_variants(text: str) -> list:
    """'bf16,nvfp4:keep-high-precision=patch_embed,blocks.5.*' -> ['bf16', 'nvfp4:keep-high-precision=
    patch_embed,blocks.5.*']: after a variant's last switch keep-high-precision=..., the pieces
    that are no precision (and have no switches) are more of its comma-separated patterns."""
    variants = []
    for piece in text.split(","):
        pattern_list = variants and variants[-1].rpartition(":")[2].startswith("keep-high-precision=")
        if pattern_list and ":" not in piece and piece not in nvfp4.PRECISIONS:
            variants[-1] += "," + piece
        elif piece:
            variants.append(piece)
    return variants


class Variant(NamedTuple):
    """One --compare variant: its text (the report's name for it) and its validated Config."""
    label: str
    config: object  # the script's Config


def parse_seeds(text: Optional[str], seed: int) -> tuple:
    """--seeds 0,1,2 -> (0, 1, 2); without it, (--seed,)."""
    if text is None:
        return (seed,)
    try:
        seeds = tuple(whole_number(s) for s in text.split(","))
    except argparse.ArgumentTypeError:
        raise UsageError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if len(set(seeds)) < len(seeds) or not all(0 <= s < 2 ** 32 for s in seeds):
        raise UsageError(f"--seeds must be distinct integers in [0, 2^32), got {text!r}")
    return seeds
