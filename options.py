"""train.py's command line: the options every run has, their help and allowed values, and the checks
that run before a run folder exists (a typo never runs something else). A method's own options come
from its module in prompts/ (DEFAULTS, HELP, CHOICES); the settings of a run are, in this order, the
flags given, what the method's family uses for the protocol and data set, the toy world's, the
method's DEFAULTS and the DEFAULTS here (settings()).
"""
import argparse
import os
import sys
import textwrap

import torch

import data
import prompts
from prompts import METHODS
from prompts.common import OPTION_CHOICES, OPTION_HELP, Range, check_settings

DESCRIPTION = ("Prompt learning for CLIP: every method of prompts/ (CoOp to PromptSRC, APLe, "
               "PMPO), one script.")
PROTOCOLS = ("base2novel", "fewshot", "crossdataset")
SWITCH = ("auto", "on", "off")

# -----------------------------------------------------------------------------
# Defaults shared by every method (the CoOp-family protocol). A method's own hyper-parameters
# (lr, batch size, epochs, prompt sizes) are DEFAULTS in prompts/<method>.py; every key of either
# can be set on the command line (--lr 0.001, --n_ctx 8, ...), with HELP as its help and CHOICES
# as its allowed values (numbers not listed there: >= 0), checked before a run folder exists.
DEFAULTS = dict(
    model="ViT-B/16", protocol="base2novel", shots=16, seed=1,
    momentum=0.9, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5,
    eval_batch_size=100, workers=min(8, os.cpu_count() or 1),
    threads=0,
    # Speed and memory switches (bench.py measures them). None changes what is learned beyond
    # float rounding.
    precision="auto", augment_on_device="auto", text_checkpointing="auto", cuda_graphs="auto",
)
HELP = dict(
    model="an OpenAI CLIP name (downloaded once, sha256-checked) or a checkpoint path",
    protocol="base2novel: train on the base classes, test on base and novel (CoCoOp Sec. 4.1); "
             "fewshot: all classes; crossdataset: all classes, then eval.py on other data sets",
    shots="K training images per class (the papers use 16)",
    seed="the shots' draw and the prompts' init (the papers average seeds 1, 2, 3)",
    momentum="SGD momentum", weight_decay="SGD weight decay",
    warmup_epochs="epochs at the constant warmup_lr before the cosine schedule starts (Dassl's)",
    warmup_lr="learning rate of the warm-up epochs",
    eval_batch_size="test images per batch",
    workers="processes decoding test images (0: in this one)",
    threads="CPU threads of torch's kernels; 0: torch's default (one per core)",
    precision="auto: bf16 on a GPU, fp32 on the CPU (fp16 needs a GPU for its loss scaling)",
    augment_on_device="resize the random crops on the device instead of with PIL (auto: on a GPU)",
    text_checkpointing="recompute text-encoder activations in backward (auto: >= 4,000 prompts "
                       "a step)",
    cuda_graphs="replay each train step as one CUDA graph (auto: on a GPU, unless fp16)",
)
# Upper bounds that catch typos before a run: warm-up lrs are 1e-5 (at most 10, as --lr); SGD weight
# decay is 5e-4 (1 would shrink the prompts by lr x 100% a step); seeds are numpy's (< 2**32); K at
# most 10,000 (no data set here has as many images a class); test batches at most 4,096 (as
# --batch_size); warm-up epochs as --epochs; at most 256 decoding processes and 1,024 threads.
CHOICES = dict(protocol=PROTOCOLS, shots=Range(1, 10000), momentum=Range(0, 1),
               eval_batch_size=Range(1, 4096), warmup_lr=Range(0, 10), weight_decay=Range(0, 1),
               seed=Range(0, 2**32 - 1), warmup_epochs=OPTION_CHOICES["epochs"],
               workers=Range(0, 256), threads=Range(0, 1024),
               precision=("auto", "fp32", "bf16", "fp16"), augment_on_device=SWITCH,
               text_checkpointing=SWITCH, cuda_graphs=SWITCH)
# On the built-in toy world (--dataset toy) these replace the DEFAULTS above, and
# its method's TOY (prompts.toy_defaults). Its CLIP is tiny: its matrices are too small to share out
# between cores, and a 600-image test set is read faster in this process than by worker processes
# that have to start first.
TOY = dict(model="toy", threads=1, workers=0)

# What may change between a run and its resume, and never splits a table: where and how fast it
# runs, and which flags spelled its settings.
FREE_KEYS = ("device", "workers", "threads", "cuda_graphs", "given")
PLACES = ("root", "out")  # where the data and the run are: not settings, so never recorded


def recorded(cfg):
    """The settings config.json and the checkpoints record: the same on every machine."""
    return {k: v for k, v in cfg.items() if k not in PLACES}


def differences(old, new):
    """{key: (old, new)} of the settings `new` gives otherwise than the recorded `old`; a key an
    older train.py did not record is not held against it, nor are the FREE_KEYS."""
    return {k: (old[k], v) for k, v in new.items()
            if k in old and k not in FREE_KEYS and old[k] != v}


def same_type(saved, value):
    """JSON's types for a setting: an int may stand for a float, a list for a tuple."""
    if value is None or saved is None:
        return True
    if isinstance(value, bool) or isinstance(saved, bool):
        return isinstance(value, bool) and isinstance(saved, bool)
    if isinstance(value, float):
        return isinstance(saved, (int, float))
    if isinstance(value, (list, tuple)):
        return isinstance(saved, (list, tuple))
    return isinstance(saved, type(value))


def parse_args(argv=None):
    """train.py's command line -> the run's settings, one dict, resolved and checked (settings()):
    every option, plus method, dataset, root, out, fewshot_file, device, the precision auto
    resolves to, and `given`, the names of the flags given. --method decides which method's options
    exist; --help without it describes every method."""
    argv = [flag_style(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method")
    pre.add_argument("--dataset")  # --help with --dataset toy shows the toy world's defaults
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.help and known.method not in METHODS:  # the shared options, then a line per method
        p = build_parser(dataset=known.dataset)
        p.epilog, flags_note = None, p.epilog
        methods = "\n".join(method_line(name) for name in METHODS)
        print(f"{p.format_help()}\nmethods (`--method NAME --help`: its options, their help and "
              f"defaults):\n{methods}\n\n{flags_note}")
        raise SystemExit(0)
    if known.method not in METHODS:
        given = "" if known.method is None else f" (got {known.method!r})"
        raise SystemExit(f"error: --method must be one of {', '.join(METHODS)}{given}; "
                         f"`python train.py --help` describes them")
    p = build_parser(known.method, known.dataset)
    args = vars(p.parse_args(argv))
    method = METHODS[known.method]
    given = {k: v for k, v in args.items()
             if k in {**DEFAULTS, **method.DEFAULTS} and v is not None}  # the flags given
    cfg = {**args, **settings(known.method, args["dataset"], given), "given": sorted(given)}
    check_values(p, cfg, DEFAULTS, CHOICES)
    check_values(p, cfg, method.DEFAULTS, {**OPTION_CHOICES, **getattr(method, "CHOICES", {})})
    check_device(p, cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}  # as JSON keeps it


def config(method, dataset, **flags):
    """parse_args without a command line: the settings train.py would run `method` on `dataset`
    with, given these flags (config("coop", "toy", device="cpu", seed=2)). bench.py, eval.py
    --benchmark and the tests build their runs' settings here, never by hand."""
    argv = ["--method", method, "--dataset", dataset]
    for key, value in flags.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key}", *map(str, values)]
    return parse_args(argv)


def shared_defaults(dataset):
    """The DEFAULTS above, with TOY's on the toy world (eval.py's defaults too)."""
    return {**DEFAULTS, **(TOY if dataset == "toy" else {})}


def settings(method, dataset, given):
    """A run's settings, each from the first of: the flags given; what the method's family uses for
    this protocol, data set and K (prompts.protocol_defaults, e.g. CoOp's 50 epochs on ImageNet);
    on the built-in toy world, its tiny CLIP and the method's TOY settings; the method's DEFAULTS;
    the DEFAULTS above."""
    toy = prompts.toy_defaults(method) if dataset == "toy" else {}
    cfg = {**shared_defaults(dataset), **METHODS[method].DEFAULTS, **toy, **given}
    protocol = prompts.protocol_defaults(method, cfg["protocol"], dataset, cfg["shots"])
    return {**cfg, **protocol, **given}


def flag_style(arg):
    """--batch-size -> --batch_size: a flag may be spelled with - or _ (values are left alone)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def build_parser(method=None, dataset=None):
    """train.py's flags: the run's, the protocol's (DEFAULTS) and `method`'s (its DEFAULTS); the
    defaults shown are the toy world's where `dataset` is toy."""
    epilog = ("Defaults are base-to-novel's; other protocols and data sets change some "
              "(prompts.protocol_defaults), and a flag given wins. Flags take - or _ alike "
              "(--batch-size = --batch_size). `--method NAME --help` shows one method's options.")
    p = Parser(description=DESCRIPTION, epilog=epilog, allow_abbrev=False)
    p.add_argument("--method", required=True, choices=list(METHODS), help="the prompt learner")
    p.add_argument("--dataset", required=True,
                   help=f"one of {', '.join(data.DATASETS)}, or folder:/path")
    p.add_argument("--root", default=os.environ.get("DATA", "data_root"),
                   help="data sets folder ($DATA)")
    p.add_argument("--out",
                   help="run folder (default runs/<dataset>/<method>/<protocol>/shots<K>_seed<S>)")
    p.add_argument("--fewshot_file", help="a fewshot.json to train on instead of sampling shots")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device,
                   help=f"cpu, cuda, cuda:1, mps (default: cuda if a GPU is seen, else cpu; "
                        f"here: {device})")
    add_options(p.add_argument_group("protocol options (every method)"), shared_defaults(dataset),
                HELP, CHOICES)
    if method:
        add_method_options(p, method, dataset)
    return p


def add_method_options(parser, method, dataset=None):
    module = METHODS[method]
    toy = prompts.toy_defaults(method) if dataset == "toy" else {}
    summary = (module.__doc__ or "").strip().split("\n")[0]
    group = parser.add_argument_group(f"--method {method}", summary)
    helps = {**OPTION_HELP, **getattr(module, "HELP", {})}
    choices = {**OPTION_CHOICES, **getattr(module, "CHOICES", {})}  # CHOICES: optional
    add_options(group, {**module.DEFAULTS, **toy}, helps, choices)


def method_line(method):
    """A method in `train.py --help`: its name, its docstring's first sentence, its options."""
    module = METHODS[method]
    name = (module.__doc__ or method).strip().split("\n")[0].split(" (")[0].rstrip(".")
    own = textwrap.fill("options: " + ", ".join(f"--{k}" for k in module.DEFAULTS), width=88,
                        initial_indent=" " * 13, subsequent_indent=" " * 22)
    return f"  {method:10} {name}\n{own}"


# flags of train.py and eval.py that name a file or folder: "" would quietly mean the default
PATHS = ("root", "out", "fewshot_file", "model", "ckpt", "summary")


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag or value said in one `error:` line (exit code 2), not after its
    usage block: the line names the flag, and --help has the rest."""

    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, and an empty path given (--out "") refused; an empty $DATA, --root's
        default, is said where the data is read."""
        known, extra = super().parse_known_args(args, namespace)
        for key in PATHS:
            value = getattr(known, key, None)
            if "" in (value if isinstance(value, list) else [value]) and (
                    value != self.get_default(key)):
                self.error(f"--{key} is empty; give a path, or leave the flag out for its default")
        return known, extra


def add_options(group, defaults, helps, choices):
    """One flag per key of defaults; its type, and a tuple's number of values, from the default.
    Parsed as None when not given, so that a flag given wins over the protocol's settings."""
    for key, default in defaults.items():
        allowed = choices.get(key)
        shown = (" ".join(map(str, default)) if isinstance(default, tuple)
                 else "''" if default == ""
                 else ("yes" if default else "no") if isinstance(default, bool) else str(default))
        shown += f"; {allowed}" if isinstance(allowed, Range) else ""
        text = f"{helps.get(key, '')} (default: {shown})"
        kwargs = dict(default=None, help=text.replace("%", "%%"))
        if isinstance(default, bool):
            kwargs.update(type=yes_no, metavar="yes|no")
        elif isinstance(default, tuple):
            kwargs.update(type=type(default[0]), nargs=len(default))
        else:
            metavar = "|".join(allowed) if isinstance(allowed, tuple) else None
            kwargs.update(type=type(default), metavar=metavar)
        group.add_argument(f"--{key}", **kwargs)


def yes_no(text):
    answer = dict(yes=True, true=True, on=True, no=False, false=False, off=False).get(text.lower())
    answer = {"1": True, "0": False}.get(text, answer)
    if answer is None:
        raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")
    return answer


def check_values(parser, cfg, defaults, choices):
    """Every value in its CHOICES; a number not listed there must be >= 0 (and finite)."""
    try:
        check_settings(cfg, defaults, choices)
    except ValueError as e:
        parser.error(str(e))


def check_device(parser, cfg):
    """--device must exist here; --precision auto becomes bf16 on a GPU, fp32 on the CPU."""
    if device_error(cfg["device"]):
        parser.error(device_error(cfg["device"]))
    if cfg["precision"] == "auto":
        cfg["precision"] = default_precision(cfg["device"])
    if cfg["precision"] == "fp16" and not cfg["device"].startswith("cuda"):
        parser.error("--precision fp16 needs a CUDA device (its loss scaling runs there); "
                     "use bf16 or fp32")
    if cfg.get("cuda_graphs") == "on" and not cfg["device"].startswith("cuda"):
        parser.error("--cuda_graphs on needs a CUDA device; use auto or off")
    if cfg.get("cuda_graphs") == "on" and cfg["precision"] == "fp16":
        parser.error("--cuda_graphs on does not go with --precision fp16 (its loss scaler reads a "
                     "value back at every step); use bf16, or --cuda_graphs off")


def device_error(device):
    """Why torch cannot compute on `device` here, or None."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)"
    if d.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is available here; use --device cpu"
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available here; use --device cpu"
    if d.type not in ("cpu", "cuda", "mps"):
        return f"--device {device}: only cpu, cuda[:N] and mps are supported"
    return None


def default_precision(device):
    return "bf16" if device.startswith("cuda") else "fp32"
