"""A run's folder: resume or refuse, never overwrite. Everything a run writes goes through
clip.files.atomic_write (a temporary name, fsync, rename): a kill or a full disk leaves
the previous version of each file, so the same command resumes after the last finished
epoch. log.txt is appended.

    config.json    the settings          prompt_learner.pt  the learned tensors, after every epoch
    fewshot.json   the exact shots       train_state.pt     optimizer and random streams (resume)
    log.txt        what train.py said    metrics.json       written last: the run is finished
    .lock          held while a process runs in the folder

Also here: the progress line and the log, and reading input with a message instead of a traceback.
"""

import fcntl
import json
import os
import random
import sys
import time
from contextlib import contextmanager

import torch

import data
from clip.files import atomic_write
from prompts import clip_architecture
from prompts.common import learned_state

RUN_FILES = ("config.json", "fewshot.json", "log.txt", "metrics.json", "prompt_learner.pt",
             "train_state.pt", ".lock")


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


def prepare_run_folder(out, cfg, stages):
    """Create `out`, or resume the unfinished run with the same settings in it; hold its lock.
    Returns the saved training state (None for a new run)."""
    check_out_folder(out)
    old = recorded_config(out)
    if finished(out):
        raise SystemExit(f"error: {out} already holds a finished run (metrics.json)"
                         f"{other_clip(old, cfg)}. Pick another --out, or delete that folder to "
                         f"run again.")
    # may change between a run and its resume
    speed = ("device", "workers", "threads", "cuda_graphs")
    changed = {k: (old.get(k), v) for k, v in cfg.items()
               if old.get(k) != v and k not in speed} if old is not None else {}
    if changed and trained_in(out):
        differences = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"error: {out} holds an unfinished run with other settings "
                         f"({differences}). Pick another --out, or delete that folder.")
    foreign = [name for name in (os.listdir(out) if os.path.isdir(out) else [])
               if name not in RUN_FILES and not name.endswith(".tmp")]
    if old is None and foreign:
        raise SystemExit(f"error: {out} exists and is not a run folder of this script; "
                         f"pick another --out.")
    with write_errors(out):
        os.makedirs(out, exist_ok=True)
    lock_run_folder(out)
    for name in os.listdir(out):  # what a killed process was writing (atomic_write's temp names)
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    if changed:  # a run stopped before its first epoch ended (bad image, NaN): nothing to keep
        print(f"note: {out} holds no finished epoch of its earlier settings; starting it over")
    if changed or read_json(os.path.join(out, "config.json")) is None:  # or new, or restored above
        save_json(os.path.join(out, "config.json"), cfg)
    return load_train_state(out, stages)


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


def recorded_config(out):
    """The settings of the run in `out`: config.json, or the checkpoint's copy if it is damaged."""
    path = os.path.join(out, "config.json")
    config = read_json(path)
    if config is not None or not os.path.exists(path):
        return config
    try:
        ckpt_path = os.path.join(out, "prompt_learner.pt")
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)["config"]
    except Exception:  # no readable checkpoint: only a run without a finished epoch restarts
        if os.path.exists(os.path.join(out, "train_state.pt")):
            raise SystemExit(f"error: {path} is damaged and no checkpoint holds the run's "
                             f"settings; delete the folder {out} to start the run over") from None
        return None


def load_train_state(out, stages):
    path = os.path.join(out, "train_state.pt")
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        return checkpoint_state(out, stages, f"{path} is damaged ({type(e).__name__})")
    check_finite(state["learned"], path)
    return state


def checkpoint_state(out, stages, damage):
    """A damaged train_state.pt: go on from the last checkpoint's prompts, so no more than the
    interrupted epoch is lost. Only the SGD momentum and the random streams start afresh."""
    path = os.path.join(out, "prompt_learner.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        learned, epochs_done = ckpt["state_dict"], ckpt["epoch"]
    except Exception:
        raise SystemExit(f"error: {damage}, and {path} cannot be read either. Delete both and "
                         f"run the same command again: the run restarts from its first epoch, "
                         f"with its settings and shots kept.") from None
    check_finite(learned, path)
    epochs = [[i, epoch] for i, (_, n) in enumerate(stages) for epoch in range(n)]
    return dict(done=epochs[:epochs_done], stage=None, rng=None, learned=learned,
                note=f"warning: {damage}; going on from prompt_learner.pt with a fresh SGD "
                     f"momentum and random stream, so the prompts will differ slightly from an "
                     f"uninterrupted run's")


def lock_run_folder(out):
    """One process per run folder: a second train.py on the same --out is refused."""
    key = os.path.abspath(out)
    if key in RUN_LOCKS:  # an earlier run of this process ended in an exception: still ours
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"error: another process (pid {pid}) is running in {out}; wait for it "
                         f"to end, or pick another --out") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
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
        method=cfg["method"], config=cfg, classnames=model.classnames, epoch=epochs_done,
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
