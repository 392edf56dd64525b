"""What every command shares: the parser (built from the command modules it finds), ``main`` and
its error contract, the argument groups, and the helpers that load a model, read its model card and
turn the sampling flags into one :class:`mage_fast.decoding.SamplingConfig`.

A command is a module of this package (its name not starting with ``_``) that defines ``NAME``,
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``, and optionally ``ORDER`` (its place in
``--help``). :func:`build_parser` finds them; nothing here lists them.

Nothing heavy is imported at module level: ``torch`` and the sampler are imported by the functions
that need them, so ``--help`` and the error paths stay quick.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

DESCRIPTION = """mage_fast command line: generate, inpaint, outpaint, edit (sampling); eval (linear probe, few-shot,
fine-tuning), fid (sample quality); info (versions and backends).

Bad input or settings print one line on stderr, ``error: ...``, and exit with status 2 before any
output is written (set MAGE_FAST_DEBUG=1 for the traceback)."""

COMMANDS_PACKAGE = "mage_fast.cli"
# What makes a module of the package a command (ORDER is optional).
COMMAND_ATTRS = ("NAME", "HELP", "add_arguments", "run")
LAST = 1000  # the place in --help of a command without ORDER

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
# Shipped models, loadable by name (--ckpt NAME). The default is the first one present.
SHIPPED = ("mage_fmnist256", "mage_fmnist")


def shipped_path(name: str) -> str:
    return os.path.join(ASSETS, name + ".pt")


DEFAULT_CKPT = next((shipped_path(n) for n in SHIPPED if os.path.isfile(shipped_path(n))), shipped_path(SHIPPED[-1]))
CKPT_HELP = f"a shipped model by name ({', '.join(SHIPPED)}); default: {os.path.basename(DEFAULT_CKPT)[:-3]}"
SEED_MAX = 2 ** 31 - 1
OFFICIAL_SAMPLING = {"num_iter": 20, "temperature": 6.0}
# The token filter's flags (--top-k, --top-p): a model card may set them; the official sampler has none.
TOKEN_FILTER_FLAGS = ("top_k", "top_p")


class CLIError(Exception):
    """A command-line mistake: printed as ``error: <message>``, exit status 2."""


# ------------------------------------------------------------------------------------ checks, notes
def need(value, flag: str, lo=None, hi=None, integer=False, lo_open=False) -> None:
    """``value`` of ``flag`` within its range (and whole where ``integer``), else a :class:`CLIError`."""
    from mage_fast.models.checks import check_number
    try:
        check_number(value, flag, lo=lo, hi=hi, integer=integer, lo_open=lo_open)
    except ValueError as e:
        raise CLIError(str(e)) from None


def pick_device(name: str):
    """``--device``: auto (CUDA where torch sees it, else the CPU), cpu, cuda or cuda:N."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name} was asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def print_notes(notes: list) -> None:
    for n in notes:
        print(f"note: {n}", file=sys.stderr)


def check_output_dir_for_file(path: str, flag: str = "--json") -> None:
    """The folder of an output file (``--json``, ``--ref-stats``) can be written, and ``path`` is no folder."""
    from mage_fast.runs import check_output_dir
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a directory; expected a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)


def write_json_atomic(path: str, obj) -> None:
    from mage_fast.runs import write_json
    write_json(path, obj, default=str)


# ----------------------------------------------------------------------------- models, model cards
def load_model(ckpt: str | None, model_name: str | None):
    """Build the model for ``ckpt``: by factory name when given, else from the checkpoint itself."""
    import mage_fast
    from mage_fast.models import MODEL_FACTORIES
    from mage_fast.models.checkpoint import build_from_checkpoint, read_state_dict
    if ckpt is None:
        if not os.path.isfile(DEFAULT_CKPT):
            raise CLIError(f"no --ckpt given and the shipped default model {DEFAULT_CKPT} is not present")
        ckpt = DEFAULT_CKPT
    elif ckpt in SHIPPED and not os.path.exists(ckpt):
        if not os.path.isfile(shipped_path(ckpt)):
            raise CLIError(f"--ckpt {ckpt}: this install does not ship that model ({shipped_path(ckpt)} is absent)")
        ckpt = shipped_path(ckpt)
    if os.path.isdir(ckpt):
        raise CLIError(f"--ckpt {ckpt} is a directory; expected a checkpoint file")
    if not os.path.isfile(ckpt):
        raise CLIError(f"checkpoint not found: {ckpt}")
    # Built without drawing initial weights where the strict load that follows replaces them all.
    if model_name is None:
        return build_from_checkpoint(ckpt, init_weights=False), ckpt
    if model_name not in MODEL_FACTORIES:
        raise CLIError(f"--model must be one of {sorted(MODEL_FACTORIES)}, got {model_name!r}")
    sd = read_state_dict(ckpt)
    whole = "token_emb.word_embeddings.weight" in sd  # else a tokenizer-only file: the rest stays random
    model = MODEL_FACTORIES[model_name](vqgan_ckpt_path=None, init_weights=not whole)
    mage_fast.load_checkpoint(model, sd)
    return model.eval(), ckpt


def model_card(ckpt: str) -> dict:
    """The checkpoint's model card, ``<ckpt>.json`` beside it ({} when there is none)."""
    from mage_fast.models.checkpoint import read_model_card
    return read_model_card(ckpt)


def model_summary(ckpt: str) -> dict:
    """The run manifest's record of the model: its path and SHA-256."""
    from mage_fast.runs import file_sha256
    return {"model": os.path.abspath(ckpt), "model_sha256": file_sha256(ckpt)}


def class_names(model, ckpt: str) -> list[str]:
    names = model_card(ckpt).get("classes") or getattr(model, "class_names", None)
    return list(names) if names else []


def sampling_defaults(ckpt: str, args) -> None:
    """Fill --num-iter / --temperature left unset: from the checkpoint's model card (``<ckpt>.json``
    beside it, key ``sampling``) when there is one, else the official README setting (20, 6.0);
    --top-k / --top-p left unset: the card's, else no filter (``args`` without them: not touched);
    --guidance left unset: the card's when a class is asked for (--class-id), else 0."""
    rec = model_card(ckpt).get("sampling", {})
    for key, official in OFFICIAL_SAMPLING.items():
        if getattr(args, key) is None:
            setattr(args, key, rec.get(key, official))
    for key in TOKEN_FILTER_FLAGS:  # the official sampler has no token filter: --rng official takes none
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, rec.get(key) if getattr(args, "rng", "torch") != "official" else None)
    if getattr(args, "guidance", 0.0) is None:
        args.guidance = float(rec.get("guidance", 0.0)) if args.class_id is not None else 0.0


def resolve_class(spec: str | None, ckpt: str, model=None):
    """``--class-id`` -> None, an int label, or "all" (image i gets label i mod the card's classes).

    Accepts a label number or a class name from the model card's ``classes`` list; with a card, the
    label must be one of its classes, and a card that says the model is not class-conditional
    refuses conditioning. Without a card the model's own range applies (``model.num_classes``, else
    the vocabulary's class range)."""
    if spec is None:
        return None
    card = model_card(ckpt)
    names = card.get("classes")
    if card and not card.get("class_conditional", names is not None):
        raise CLIError(f"{ckpt} was trained unconditionally (its model card says so); drop --class-id")
    if spec == "all":
        if not names:
            raise CLIError("--class-id all needs a model card listing the classes")
        return "all"
    if spec.lstrip("-").isdigit():
        label = int(spec)
    elif names and spec in names:
        label = names.index(spec)
    else:
        known = f": one of {', '.join(names)}" if names else ""
        raise CLIError(f"--class-id is a label number{' or a class name' if names else ''}{known}; got {spec!r}")
    n = len(names) if names else (getattr(model, "num_classes", None) or getattr(model, "num_classes_max", None))
    if n is not None and not 0 <= label < n:
        raise CLIError(f"--class-id {label} is outside the model's {n} classes (0..{n - 1})")
    return label


# --------------------------------------------------------------------------------- sampling options
def check_sampling_args(args, count_flag: str) -> None:
    """Settings every sampling command shares, checked before anything is loaded or written."""
    need(getattr(args, count_flag.lstrip("-").replace("-", "_")), count_flag, lo=1, integer=True)
    if args.num_iter is not None:
        need(args.num_iter, "--num-iter", lo=1, hi=10_000, integer=True)
    if args.temperature is not None:
        need(args.temperature, "--temperature", lo=0)
    if args.guidance is not None:
        need(args.guidance, "--guidance", lo=0)
    if getattr(args, "top_k", None) is not None:
        need(args.top_k, "--top-k", lo=0, integer=True)
    if getattr(args, "top_p", None) is not None:
        need(args.top_p, "--top-p", lo=0, hi=1)
        if not args.top_p > 0:
            raise CLIError(f"--top-p must be in (0, 1] (1 keeps every code), got {args.top_p}")
    need(args.seed, "--seed", lo=0, hi=SEED_MAX, integer=True)
    if args.guidance is not None and args.guidance > 0 and args.class_id is None:
        raise CLIError("--guidance needs --class-id: classifier-free guidance steers towards a class")


def check_mode(args, dev) -> None:
    """``--mode``: ``auto`` becomes the preset for ``dev``, by name (so run.json and --resume hold
    what ran; named once on stderr by rank 0); a bad name or spec is one line (ValueError, exit 2),
    before any folder is made."""
    from mage_fast.decoding import AUTO, auto_mode, resolve_mode
    if args.mode == AUTO:
        args.mode = auto_mode(dev)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--mode auto: {args.mode} on this {dev.type} "
                  f"({'bf16 multiplies natively' if args.mode.endswith('bf16') else 'fp32: bf16 is not native here'})",
                  file=sys.stderr)
    resolve_mode(args.mode)


def slow_mode_note(spec: str, dev) -> None:
    """One note when ``--mode`` runs on ``dev`` but slower than fp32 (bf16 without bf16 units, int8
    without int8 units); the caller silences generate()'s own warning of the same
    (:func:`slow_mode_said_once`)."""
    from mage_fast.decoding import DecodeMode, resolve_mode, slow_mode_message
    mode = resolve_mode(spec)  # a bad spec was refused by check_mode
    slow = slow_mode_message(mode.quant, dev) if isinstance(mode, DecodeMode) else None  # registered modes: theirs
    if slow:
        print_notes([f"--mode {spec}: {slow}"])


@contextlib.contextmanager
def slow_mode_said_once():
    """Silences generate()'s SlowModeWarning: the command says it once, as a note (:func:`slow_mode_note`)."""
    import warnings

    from mage_fast.decoding import SlowModeWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowModeWarning)
        yield


def sampling_config(args, **changes):
    """The command's sampling settings as one :class:`mage_fast.decoding.SamplingConfig` (after
    :func:`sampling_defaults`; checked when made, a bad one is an InputError, one line); the flags a
    command lacks take generate()'s defaults, except the sampler: ``--rng`` when the command has it,
    else ``torch``."""
    from mage_fast.decoding import SamplingConfig
    kw = dict(num_iter=args.num_iter, temperature=args.temperature, seed=args.seed,
              sampler=getattr(args, "rng", "torch"), schedule=args.schedule, guidance_scale=args.guidance)
    for name in ("temperature_annealing", "guidance_schedule", "order", "mode"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    kw["top_k"], kw["top_p"] = token_filter_settings(getattr(args, "top_k", None), getattr(args, "top_p", None))
    kw.update(changes)
    return SamplingConfig(**kw)


def token_filter_settings(top_k, top_p) -> tuple:
    """--top-k / --top-p (checked flags or a card's values, where 0 and 1 keep every code) as
    ``SamplingConfig``'s ``top_k`` / ``top_p`` (``None`` keeps every code)."""
    return top_k or None, top_p if top_p is not None and top_p < 1 else None


def mode_help() -> str:
    """--mode's help, from the registry of modes (:data:`mage_fast.decoding.MODES`)."""
    from mage_fast.decoding import MODES, SPEC_HELP
    names = "; ".join(f"{name}: {summary}" for name, summary in MODES.table())
    return (f"decoding mode (default: exact): {names}; auto: fast_bf16 where this device multiplies bf16 "
            f"natively, else fast; or {SPEC_HELP}. docs/DECODING.md; "
            f"`python -m mage_fast info` lists them")


# ---------------------------------------------------------------------------------- argument groups
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help text already says what the default is."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (argparse.SUPPRESS,) or isinstance(action, argparse._VersionAction):
            return h
        if action.default is None and action.option_strings:
            return h + " (default: none)" if h else "(default: none)"
        return super()._get_help_string(action)


def add_device_arg(p) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_model_args(p) -> None:
    """--ckpt, --model and --device: the model a command runs and where."""
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", default=None,
                   help="checkpoint file ({'model': sd} official or mage_fast), or " + CKPT_HELP)
    g.add_argument("--model", default=None,
                   help="vit_base | vit_large | tiny (default: inferred from the checkpoint)")
    add_device_arg(g)


GENERATE_SEED_HELP = "random seed (rng=official: batch b uses seed + b)"
GENERATE_RNG_HELP = ("torch: image i depends only on the seed and i (any batch size, resumable); official: the "
                     "official script's numbers exactly (batch b seeded with seed + b)")
GENERATE_CLASS_HELP = ("class-conditional models: a label number, a class name from the model card, or 'all' "
                       "(image i gets class i mod the number of classes; one grid column per class); "
                       "default: unconditional")


def add_sampling_args(p, *, seed_help: str = GENERATE_SEED_HELP, rng_help: str = GENERATE_RNG_HELP,
                      class_help: str = GENERATE_CLASS_HELP) -> None:
    """The flags of :class:`mage_fast.decoding.SamplingConfig` plus --class-id, in one group."""
    from mage_fast.decoding import GUIDANCE_SCHEDULES, ORDERS, SAMPLERS, SCHEDULES, TEMPERATURE_ANNEALING
    g = p.add_argument_group("sampling")
    g.add_argument("--num-iter", type=int, default=None,
                   help="decoding steps (default: the checkpoint's model card, else the official 20)")
    g.add_argument("--temperature", type=float, default=None,
                   help="confidence-noise temperature, >= 0 (default: the model card's, else the official 6.0)")
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    g.add_argument("--rng", choices=tuple(sorted(SAMPLERS, reverse=True)), default="torch", help=rng_help)
    g.add_argument("--mode", default="exact", help=mode_help())
    g.add_argument("--order", default="confidence", choices=ORDERS,
                   help="which masked tokens a step fixes: the most confident (official) or a fixed Halton order "
                        "spread over the image (--rng torch)")
    g.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="mask schedule")
    g.add_argument("--temperature-annealing", default="linear", choices=sorted(TEMPERATURE_ANNEALING),
                   help="how the confidence noise decays over the steps")
    g.add_argument("--class-id", default=None, help=class_help)
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, >= 0; needs --class-id (default: the model card's with "
                        "--class-id, else 0)")
    g.add_argument("--guidance-schedule", default="constant", choices=sorted(GUIDANCE_SCHEDULES),
                   help="constant: s at every step; linear: s (t+1)/T")
    g.add_argument("--top-k", type=int, default=None,
                   help="draw each token from its K most likely codes only; 0: all (default: the model card's, "
                        "else all; --rng torch)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus: draw each token from the most likely codes holding this much probability, in "
                        "(0, 1]; 1: all (default: the model card's, else all; --rng torch)")


def add_run_folder_args(p, out: str, resumable: bool) -> None:
    """--out and how a run treats a folder that already holds one (mage_fast.runs)."""
    g = p.add_argument_group("run folder (run.json records the run; see the README)")
    g.add_argument("--out", default=out, help="output folder")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its samples, grid and manifest)")
    if resumable:
        g.add_argument("--resume", action="store_true",
                       help="finish the run already in --out: the same settings, skipping images already written")


# ----------------------------------------------------------------------------------- parser, main
def command_modules(package=COMMANDS_PACKAGE) -> list:
    """The command modules of ``package`` (a dotted name or an imported package): every module in it
    whose name does not start with ``_`` and that defines ``NAME``, ``HELP``, ``add_arguments`` and
    ``run``, ordered by ``ORDER`` (default: after the numbered ones), then ``NAME``."""
    import importlib
    import pkgutil
    pkg = importlib.import_module(package) if isinstance(package, str) else package
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if not all(hasattr(mod, a) for a in COMMAND_ATTRS):
            continue
        if mod.NAME in found:
            raise RuntimeError(f"two modules of {pkg.__name__} define the command {mod.NAME!r}: "
                               f"{found[mod.NAME].__name__} and {mod.__name__}")
        found[mod.NAME] = mod
    return sorted(found.values(), key=lambda m: (getattr(m, "ORDER", LAST), m.NAME))


def build_parser(package=COMMANDS_PACKAGE) -> argparse.ArgumentParser:
    """The parser of every command in ``package`` (:func:`command_modules`); each subparser's
    ``fn`` is its module's ``run``."""
    import torch

    import mage_fast
    p = argparse.ArgumentParser(prog="python -m mage_fast", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"mage_fast {mage_fast.__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for mod in command_modules(package):
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(fn=mod.run)
    return p


def main(argv=None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns the exit status.

    Bad input (:class:`CLIError`, ``ValueError`` such as ``InputError`` and ``CheckpointError``,
    ``OSError``, ``ImportError``) is one line on stderr, ``error: ...``, and status 2
    (``MAGE_FAST_DEBUG=1`` raises it instead); under torchrun the first rank to fail says it, naming
    itself. Any other exception keeps its traceback in one process, and on a rank of several ends
    every rank (:mod:`mage_fast.script_exit`)."""
    args = build_parser().parse_args(argv)
    from mage_fast import script_exit
    # InputError and CheckpointError are ValueErrors
    return script_exit.guarded(lambda: args.fn(args), (CLIError, ValueError, OSError, ImportError))
