"""A run's folder: resume or refuse, never overwrite. Everything a run writes goes through
clip.files.atomic_write (a temporary name, fsync, rename): a kill or a full disk leaves
the previous version of each file, so the same command resumes after the last finished
epoch. log.txt is appended.

    config.json    the settings          prompt_learner.pt  the learned tensors, after every epoch
    fewshot.json   the exact shots       train_state.pt     optimizer and random streams (resume)
    log.txt        what train.py said    metrics.json       written last: the run is finished
    .lock          held while a process runs in the folder
    .run_folder    written first, when the folder is made: only a folder with it is ever written in

Also here: the progress line and the log, and reading input with a message instead of a traceback.
"""

import fcntl
import json
import os
import random
import re
import sys
import time
from contextlib import contextmanager, suppress

import torch

import data
import options
import prompts
from clip.files import atomic_write
from prompts import clip_architecture
from prompts.common import learned_state

RUN_FILES = ("config.json", "fewshot.json", "log.txt", "metrics.json", "prompt_learner.pt",
             "train_state.pt", ".lock", ".run_folder")
MARKER = ".run_folder"
# atomic_write's temporary names for the run files: ".config.json.k3j_9x2a.tmp" (tempfile.mkstemp)
TEMP_NAME = re.compile(r"\.(%s)\.[a-z0-9_]+\.tmp" % "|".join(map(re.escape, RUN_FILES)))
# keys every config.json of train.py has had (a folder from before the marker file counts as ours)
CONFIG_KEYS = ("method", "dataset", "protocol", "shots", "seed", "model")


@contextmanager
def write_errors(path):
    """A full disk or a folder that cannot be written: a message, not a traceback."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"error: could not write {path}: {e.strerror or e}. The files written "
                         f"before are intact: make room (or fix the folder) and run the same "
                         f"command again to continue.") from None


def save_json(path, obj):
    with write_errors(path), atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def save_torch(path, obj):
    with write_errors(path), atomic_write(path, "wb") as f:
        torch.save(obj, f)


def read_json(path):
    """The JSON at path, or None if it is missing or damaged (e.g. 0 bytes after a full disk)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_config(path, cfg=None):
    """A run's config.json: None if missing or damaged (0 bytes after a full disk; the checkpoint
    holds a copy), else a dict whose values have the types of cfg's (a hand edit is refused)."""
    config = read_json(path)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise SystemExit(f"error: {path} holds a JSON {type(config).__name__}, not the run's "
                         f"settings (an object); restore it, or delete the folder to start over")
    for key, value in (cfg or {}).items():
        if key in config and not same_type(config[key], value):
            raise SystemExit(f"error: {path}: {key} is {config[key]!r} "
                             f"({type(config[key]).__name__}), not a {type(value).__name__} as "
                             f"train.py writes it; restore it (e.g. {key}: {value!r}), or delete "
                             f"the folder to start over")
    return config


def same_type(recorded, value):
    """JSON's types for a setting: an int may stand for a float, a list for a tuple."""
    if value is None or recorded is None:
        return True
    if isinstance(value, bool) or isinstance(recorded, bool):
        return isinstance(value, bool) and isinstance(recorded, bool)
    if isinstance(value, float):
        return isinstance(recorded, (int, float))
    if isinstance(value, (list, tuple)):
        return isinstance(recorded, list)
    return isinstance(recorded, type(value))


def check_ours(out):
    """Refuse, touching nothing, a folder this program did not make: its files may merely carry
    run-file names (a user's own config.json, a colleague's prompt_learner.pt)."""
    if not os.path.isdir(out) or is_run_folder(out):
        return
    names = sorted(os.listdir(out))
    raise SystemExit(f"error: --out {out} exists and is not a run folder of train.py (no {MARKER} "
                     f"file; it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); "
                     f"nothing in it was changed. Pick another --out (a new or empty folder).")


def is_run_folder(out):
    """Written by this program: its marker file, or a config.json of ours from before the marker
    existed; or it holds nothing a user made (empty, a lock and temporary files of ours)."""
    names = os.listdir(out)
    if MARKER in names or all(n == ".lock" or TEMP_NAME.fullmatch(n) for n in names):
        return True
    config = read_json(os.path.join(out, "config.json"))
    return isinstance(config, dict) and all(k in config for k in CONFIG_KEYS)


def make_run_folder(out):
    """Make `out` (or take an empty one) and mark it as a run folder first."""
    with write_errors(out):
        os.makedirs(out, exist_ok=True)
    with write_errors(out), open(os.path.join(out, MARKER), "a"):
        pass  # empty: whole or absent without atomic_write (its name is all it says)


def check_out_folder(out):
    """--out must be (or become) a folder this process can write in; checked before it is made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file; give a folder for the run")
    if unwritable(out):
        raise SystemExit(f"error: --out {out} cannot be made: {unwritable(out)}")


def unwritable(path):
    """Why `path` (a folder, or a file or folder to be made) cannot be written here, or None."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} cannot be written (read-only?)"
    return None


def prepare_run_folder(out, cfg, stages, expected=None):
    """Create `out`, or resume the unfinished run with the same settings in it; hold its lock.
    Returns the saved training state (None for a new run). expected: what the run's checkpoints
    must hold (expected_state), so that another run's prompts are never resumed from."""
    check_out_folder(out)
    check_ours(out)
    cfg = recorded(cfg)
    old = recorded_config(out, cfg)
    if finished(out):
        raise SystemExit(f"error: {out} already holds a finished run (metrics.json)"
                         f"{other_clip(old, cfg)}. Pick another --out, or delete that folder to "
                         f"run again.")
    changed = {k: (old.get(k), v) for k, v in cfg.items()
               if old.get(k) != v and k not in SPEED_KEYS} if old is not None else {}
    if changed and trained_in(out):
        differences = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"error: {out} holds an unfinished run with other settings "
                         f"({differences}). Pick another --out, or delete that folder.")
    make_run_folder(out)
    lock_run_folder(out)
    for name in os.listdir(out):  # what a killed process was writing (atomic_write's temp names)
        if TEMP_NAME.fullmatch(name):
            os.remove(os.path.join(out, name))
    if changed:  # a run stopped before its first epoch ended (bad image, NaN): nothing to keep
        print(f"note: {out} holds no finished epoch of its earlier settings; starting it over")
    if changed or read_json(os.path.join(out, "config.json")) is None:  # or new, or restored above
        save_json(os.path.join(out, "config.json"), cfg)
    return load_train_state(out, stages, cfg, expected)


def other_clip(old, cfg):
    """", made with another CLIP (...)" when the recorded run's CLIP file is
    not this one, else ""."""
    if old is None or old.get("clip_sha256") == cfg["clip_sha256"]:
        return ""
    return (f", made with another CLIP (sha256 {old.get('clip_sha256') or 'not recorded'}; "
            f"{cfg['model']} now is {cfg['clip_sha256']})")


def finished(out):
    """metrics.json is written last; a damaged one (a disk error) means: evaluate again."""
    return isinstance(read_json(os.path.join(out, "metrics.json")), dict)


def trained_in(out):
    """Whether the run in `out` has finished an epoch (or its --epochs 0): then it keeps its
    settings and its shots."""
    return any(os.path.exists(os.path.join(out, name))
               for name in ("prompt_learner.pt", "train_state.pt"))


def recorded_config(out, cfg=None):
    """The settings of the run in `out`: config.json, or the checkpoint's copy if it is damaged."""
    path = os.path.join(out, "config.json")
    config = read_config(path, cfg)
    if config is not None or not os.path.exists(path):
        return config
    try:
        config = read_checkpoint(os.path.join(out, "prompt_learner.pt"))["config"]
        if not isinstance(config, dict):
            raise SystemExit
        return config
    except SystemExit:  # no readable checkpoint: only a run without a finished epoch restarts
        if os.path.exists(os.path.join(out, "train_state.pt")):
            raise SystemExit(f"error: {path} is damaged and no checkpoint holds the run's "
                             f"settings; delete the folder {out} to start the run over") from None
        return None


def load_train_state(out, stages, cfg=None, expected=None):
    path = os.path.join(out, "train_state.pt")
    if not os.path.exists(path):
        return None
    try:
        return read_checkpoint(path, cfg, expected, kind="train_state")
    except Damaged as e:
        return checkpoint_state(out, stages, str(e.code).removeprefix("error: "), cfg, expected)


def checkpoint_state(out, stages, damage, cfg=None, expected=None):
    """A damaged train_state.pt: go on from the last checkpoint's prompts, so no more than the
    interrupted epoch is lost. Only the SGD momentum and the random streams start afresh."""
    path = os.path.join(out, "prompt_learner.pt")
    try:
        ckpt = read_checkpoint(path, cfg, expected)
    except SystemExit as e:
        raise SystemExit(f"error: {damage}, and {path} cannot be read either: "
                         f"{str(e.code).removeprefix('error: ')}. Delete both and run the same "
                         f"command again: the run restarts from its first epoch, with its "
                         f"settings and shots kept.") from None
    learned, epochs_done = ckpt["state_dict"], ckpt["epoch"]
    epochs = [[i, epoch] for i, (_, n) in enumerate(stages) for epoch in range(n)]
    return dict(done=epochs[:epochs_done], stage=None, rng=None, learned=learned,
                note=f"warning: {damage}; going on from prompt_learner.pt with a fresh SGD "
                     f"momentum and random stream, so the prompts will differ slightly from an "
                     f"uninterrupted run's")


# What may change between a run and its resume, and never splits a table: where and how fast it
# runs, and which flags spelled its settings.
SPEED_KEYS = ("device", "workers", "threads", "cuda_graphs", "given")
PLACES = ("root", "out")  # where the data and the run are: not settings, so never recorded


def recorded(cfg):
    """The settings config.json and the checkpoints record: the same on every machine."""
    return {k: v for k, v in cfg.items() if k not in PLACES}
CHECKPOINT_KEYS = dict(prompt_learner=("method", "config", "classnames", "epoch", "state_dict"),
                       train_state=("done", "stage", "optimizer", "rng", "learned"))


def expected_state(model, cfg):
    """What a checkpoint of this run holds: its method, class names and learned tensors' shapes
    (prompt_learner.pt: the parameters; train_state.pt: with the buffers)."""
    def shapes(buffers):
        return {k: tuple(v.shape) for k, v in learned_state(model, buffers=buffers).items()}
    return dict(method=cfg["method"], classnames=list(model.classnames),
                prompt_learner=shapes(False), train_state=shapes(True))


# what train.py's save_checkpoint writes, with the type each value must have
PROMPT_CHECKPOINT = dict(method=str, config=dict, classnames=list, epoch=int,
                         clip_architecture=dict, state_dict=dict)
# the config keys train.py records as strings (and the method's own string options)
CONFIG_STRINGS = ("method", "model", "protocol", "dataset", "device", "precision")


def checkpoint_problem(ckpt):
    """What is wrong in a checkpoint's values (None if nothing): keys, types, the config's."""
    for key, kind in PROMPT_CHECKPOINT.items():
        if key not in ckpt:
            return f"it has no {key!r}"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"its {key!r} is a {type(ckpt[key]).__name__}, not a {kind.__name__}"
    if ckpt["epoch"] < 0:
        return f"its epoch is {ckpt['epoch']}"
    if not ckpt["classnames"] or not all(isinstance(c, str) and c for c in ckpt["classnames"]):
        return "its classnames are not a list of names"
    if not ckpt["state_dict"]:
        return "its state_dict is empty: the learned tensors are missing"
    bad = [k for k, t in ckpt["state_dict"].items() if not torch.is_tensor(t)]
    if bad:
        return f"its state_dict's {bad[0]} is a {type(ckpt['state_dict'][bad[0]]).__name__}, " \
               f"not a tensor"
    arch = ckpt["clip_architecture"]
    if not all(type(arch.get(k)) is int for k in ("embed_dim", "image_resolution", "text_width")):
        return f"its clip_architecture {arch} is not a CLIP's"
    return config_problem(ckpt["config"], ckpt["method"])


def config_problem(cfg, method):
    """What is wrong in a checkpoint's config: the method's options, each of its default's type."""
    if cfg.get("method") != method:
        return f"it holds {method} prompts, but its config says method {cfg.get('method')!r}"
    defaults = {**options.DEFAULTS, **prompts.METHODS[method].DEFAULTS}
    for key in (*CONFIG_STRINGS, *prompts.METHODS[method].DEFAULTS):
        if key not in cfg:
            return f"its config has no {key!r}"
    for key, value in cfg.items():
        want = str if key in CONFIG_STRINGS else type(defaults.get(key))
        # an option whose default is None (fewshot_file) takes any value
        if value is None and key not in CONFIG_STRINGS or want is type(None):
            continue
        ok = (isinstance(value, (list, tuple)) if want in (list, tuple)
              else isinstance(value, (int, float)) and not isinstance(value, bool)
              if want is float else type(value) is want)
        if not ok:
            return f"its config's {key} is {value!r}, not a {want.__name__}"
    return None


class Damaged(SystemExit):
    """A checkpoint that cannot be read at all (a full disk, a kill on a filesystem without
    atomic renames), as opposed to one that can but belongs elsewhere."""


def read_checkpoint(path, cfg=None, expected=None, kind="prompt_learner"):
    """prompt_learner.pt or train_state.pt (kind), checked against the run it should belong to
    (cfg, expected_state): SystemExit naming the file and what is wrong, else the dict."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Damaged(f"error: {path} is damaged: it could not be read "
                      f"({type(e).__name__})") from None
    if kind == "prompt_learner":
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or \
                ckpt.get("method") not in prompts.METHODS:
            raise SystemExit(f"error: {path} is not a prompt checkpoint written by train.py "
                             f"(a CLIP checkpoint goes to --model instead)")
        problem = checkpoint_problem(ckpt)
        if problem:
            raise SystemExit(f"error: {path} is damaged or was edited: {problem}. Use the "
                             f"prompt_learner.pt that train.py wrote (or train again)")
    missing = [k for k in CHECKPOINT_KEYS[kind] if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} is not a {kind}.pt of train.py (no {', '.join(missing)})")
    tensors = ckpt["state_dict" if kind == "prompt_learner" else "learned"]
    if not isinstance(tensors, dict) or not isinstance(ckpt.get("epoch", 0), int):
        raise SystemExit(f"error: {path} is not a {kind}.pt of train.py (no tensors or epoch)")
    check_finite(tensors, path)
    if kind == "prompt_learner" and cfg is not None:
        old = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
        # keys an older train.py did not record are not held against it
        other = [f"{k}: {old[k]!r} (this run: {v!r})" for k, v in cfg.items()
                 if k in old and k not in SPEED_KEYS and k != "clip_sha256" and old[k] != v]
        if other:
            raise SystemExit(f"error: {path} belongs to another run ({', '.join(other[:3])})")
    if expected is None:
        return ckpt
    if kind == "prompt_learner" and ckpt["method"] != expected["method"]:
        raise SystemExit(f"error: {path} holds {ckpt['method']!r} prompts, this run is "
                         f"{expected['method']!r}")
    if kind == "prompt_learner" and list(ckpt["classnames"]) != expected["classnames"]:
        raise SystemExit(f"error: {path} was trained on other classes than this run's")
    shapes = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in tensors.items()}
    if shapes != expected[kind]:
        wrong = sorted(set(shapes.items()) ^ set(expected[kind].items()))
        raise SystemExit(f"error: {path} holds other learned tensors than this run's "
                         f"({', '.join(f'{k} {s}' for k, s in wrong[:3])})")
    return ckpt


def lock_run_folder(out):
    """One process per run folder: a second train.py on the same --out is refused."""
    key = os.path.abspath(out)
    if key in RUN_LOCKS:  # an earlier run of this process ended in an exception: still ours
        return
    path = os.path.join(out, ".lock")
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder, where train.py keeps its lock file; remove "
                         f"it (rmdir {path}) and run the same command again")
    with write_errors(path):
        f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"error: another process (pid {pid}) is running in {out}; wait for it "
                         f"to end, or pick another --out") from None
    # the lock is the flock; the pid only tells a second process whom it waits for, so a full
    # disk (ENOSPC) may leave it out
    with suppress(OSError):
        os.ftruncate(f.fileno(), 0)
        os.write(f.fileno(), str(os.getpid()).encode())
    RUN_LOCKS[key] = f


FILE_LOCKS = {}  # path -> its open file, while this process holds it (benchmark.py's evaluations)


def try_lock(path):
    """Hold an exclusive lock on the file `path` (made if missing); False
    if another process does."""
    key = os.path.abspath(path)
    if key in FILE_LOCKS:
        return True
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return False
    FILE_LOCKS[key] = f
    return True


def unlock(path, remove=True):
    f = FILE_LOCKS.pop(os.path.abspath(path), None)
    if f:
        if remove:
            os.remove(f.name)
        f.close()


def unlock_run_folder(out):
    f = RUN_LOCKS.pop(os.path.abspath(out), None)
    if f:
        os.remove(f.name)
        f.close()


def save_checkpoint(out, model, cfg, epochs_done):
    """Only the learned tensors (KB to a few MB), never CLIP, and what is needed to use them."""
    save_torch(os.path.join(out, "prompt_learner.pt"), dict(
        method=cfg["method"], config=recorded(cfg), classnames=model.classnames, epoch=epochs_done,
        clip_architecture=clip_architecture(model.clip), state_dict=learned_state(model)))


def last_good(out):
    if trained_in(out):
        return f"the last good checkpoint is in {out}"
    return f"no epoch had finished, so the same command with other settings starts {out} over"


def recorded_shots(out, ds, train, val):
    """On resume, the shots the run started with (its fewshot.json), even if the data changed."""
    path = os.path.join(out, "fewshot.json")
    if not trained_in(out) or not os.path.isfile(path) or finished(out):  # today's draw
        return train, val
    try:
        recorded = data.load_fewshot(path, ds.image_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {e}). Delete that file "
                         f"and run the same command again to draw the shots from --seed anew (the "
                         f"same draw if the data set is unchanged), or delete {out} to start "
                         f"over.") from None
    for item in recorded[0] + recorded[1]:
        now = ds.classnames[item.label] if 0 <= item.label < len(ds.classnames) else None
        if now != data.prompt_name(item.classname):
            raise SystemExit(f"error: {path} records label {item.label} as "
                             f"{item.classname!r}, but {ds.name} now has {now!r} there: the data "
                             f"set changed since this run started. Restore it, or delete {out} "
                             f"to start over.")
    if [(d.impath, d.label) for d in recorded[0]] != [(d.impath, d.label) for d in train]:
        print(f"note: training on the shots recorded in {path}, not on today's draw "
              f"(the data set changed)")
    return recorded


def rng_state(loader):
    """The random streams training draws from (numpy draws nothing after the shots are sampled)."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                loader=loader.generator.get_state(), crops=loader.dataset.generator.get_state())


def restore_rng(state, loader):
    rng = state["rng"]
    if rng is None:  # resumed from a checkpoint (train_state.pt was damaged): streams start afresh
        return
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    loader.generator.set_state(rng["loader"])
    loader.dataset.generator.set_state(rng["crops"])


def safe_name(name):
    """A data set or model name as one folder name: "folder:/data/x" -> "folder__data_x",
    "ViT-B/16" -> "ViT-B_16"."""
    return name.replace(":", "_").replace("/", "_")


@contextmanager
def interrupted():
    """Ctrl-C: one line instead of a traceback, and the shell's exit status for SIGINT (130)."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted; the run resumes from its last finished epoch with the same command",
              file=sys.stderr)
        raise SystemExit(130) from None


@contextmanager
def clear_errors():
    """Bad input (no data set where it should be, a damaged checkpoint, an unreadable image) ends
    the run with the message that says what to do, not with a traceback. Wraps only the calls that
    read input."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # from a DataLoader worker: the last line is the error
            message = message.splitlines()[-1]
        if len(message) > 1000:  # e.g. a 5,000-letter --ctx_init quoted back
            message = message[:600] + " [...] " + message[-300:]
        raise SystemExit(f"error: {message}") from None


def check_finite(tensors, source):
    """Stop, naming them, if loaded tensors hold NaN or infinity (chance-level results)."""
    bad = [k for k, t in tensors.items()
           if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise SystemExit(f"error: {source}: NaN or infinite values in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}; the file is damaged or was trained "
                         f"with a too-high lr")


RUN_LOCKS = {}  # run folder -> its open .lock file, held until the run ends (a kill drops it)


class Progress:
    """Progress inside a loop over batches: step, images/s and ETA on stderr (not in log.txt).
    On a terminal one line rewrites itself (at most 5 times a second); otherwise a plain line
    every minute."""

    def __init__(self, what, steps, every=60.0):
        self.what, self.steps, self.images = what, steps, 0
        self.tty = sys.stderr.isatty()
        self.every = 0.2 if self.tty else every
        self.start = self.shown = time.time()

    def __call__(self, step, images, note=None):
        """After `step` of `steps` batches, the last one of `images` images. note: a function whose
        text ends the line, called only when a line is shown (train: the loss, read back then)."""
        self.images += images
        now = time.time()
        if now - self.shown < self.every and step < self.steps:
            return
        self.shown, seconds = now, max(now - self.start, 1e-9)
        eta = (self.steps - step) * seconds / step
        line = (f"{self.what}  step {step}/{self.steps}  {self.images / seconds:.1f} img/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" + (f"  {note()}" if note else ""))
        sys.stderr.write(f"\r{line}\033[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:  # the line goes; the loop logs its own summary
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


class Log:
    def __init__(self, path):
        self.path = path
        with write_errors(path):
            self.file = open(path, "a")

    def __call__(self, msg):
        print(msg, flush=True)
        with write_errors(self.path):
            self.file.write(msg + "\n")
            self.file.flush()
