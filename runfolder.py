"""A run's folder: resume or refuse, never overwrite. Everything a run writes goes through
clip.files.atomic_write (a temporary name, fsync, rename): a kill or a full disk leaves
the previous version of each file, so the same command resumes after the last finished
epoch. log.txt is appended.

    config.json    the settings          prompt_learner.pt  the learned tensors, after every epoch
    fewshot.json   the exact shots       train_state.pt     optimizer and random streams (resume)
    log.txt        what train.py said    metrics.json       written last: the run is finished
    .lock          held while a process runs in the folder
    .run_folder    written first, when the folder is made: only a folder with it is ever written in
"""

import fcntl
import json
import os
import random
import re
from contextlib import suppress

import torch

import data
import options
import prompts
from checkpoint import Damaged, read_checkpoint
from clip.files import atomic_write, load_json
from console import write_errors

RUN_FILES = ("config.json", "fewshot.json", "log.txt", "metrics.json", "prompt_learner.pt",
             "train_state.pt", ".lock", ".run_folder")
MARKER = ".run_folder"
# atomic_write's temporary names for the run files: ".config.json.k3j_9x2a.tmp" (tempfile.mkstemp)
TEMP_NAME = re.compile(r"\.(%s)\.[a-z0-9_]+\.tmp" % "|".join(map(re.escape, RUN_FILES)))


def save_json(path, obj):
    with write_errors(path), atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def read_json(path):
    """The JSON at path, or None if it is missing or damaged (e.g. 0 bytes after a full disk)."""
    try:
        return load_json(path, "JSON file", "")
    except (OSError, ValueError):
        return None


def read_config(path):
    """A run's config.json, the one reader of it: None if it is missing or unreadable (0 bytes
    after a full disk; the checkpoint holds a copy), else its settings, each of the type train.py
    writes. A hand-edited one raises ValueError naming the key and what it should be."""
    config = read_json(path)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a run's settings "
                         f"(an object)")
    for key, kind in dict(method=str, protocol=str, dataset=str, shots=int, seed=int).items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ValueError(f"{path}: {key} is {config.get(key)!r}, not a {kind.__name__}")
    if config["shots"] < 1 or config["seed"] < 0 or config["protocol"] not in options.PROTOCOLS:
        raise ValueError(f"{path}: protocol {config['protocol']!r}, shots {config['shots']} or "
                         f"seed {config['seed']} is not train.py's")
    method = config["method"]
    defaults = options.settings(method, config["dataset"], {}) if method in prompts.METHODS else {}
    for key, value in defaults.items():
        if key in config and not options.same_type(config[key], value):
            raise ValueError(f"{path}: {key} is {config[key]!r} ({type(config[key]).__name__}), "
                             f"not a {type(value).__name__} as train.py writes it (e.g. "
                             f"{key}: {value!r})")
    return config


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
    """Ours to write in: made by this program (its marker, written before anything else), or
    empty. A name or a key like ours (config.json, .lock, a temporary name) is no sign of it."""
    names = os.listdir(out)
    return MARKER in names or not names


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
    cfg = options.recorded(cfg)
    old = recorded_config(out)
    if finished(out):
        raise SystemExit(f"error: {out} already holds a finished run (metrics.json)"
                         f"{other_clip(old, cfg)}. Pick another --out, or delete that folder to "
                         f"run again.")
    changed = options.differences(old, cfg) if old is not None else {}
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


def recorded_config(out):
    """The settings of the run in `out`: config.json, or the checkpoint's copy if it is damaged."""
    path = os.path.join(out, "config.json")
    try:
        config = read_config(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}; restore it, or delete the folder {out} to start "
                         f"over") from None
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


FILE_LOCKS = {}  # path -> its open file, while this process holds it (reproduce.py's evaluations)


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


def last_good(out):
    if trained_in(out):
        return f"the last good checkpoint is in {out}"
    return f"no epoch had finished, so the same command with other settings starts {out} over"


def recorded_shots(out, ds, train, val):
    """On resume, the shots the run started with (its fewshot.json), even if the data changed."""
    check_ours(out)  # a user's folder is refused before its files are read as a run's
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


RUN_LOCKS = {}  # run folder -> its open .lock file, held until the run ends (a kill drops it)


