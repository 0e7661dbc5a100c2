"""Issue 25, train side: hostile run folders and options, as classes of cases.

Each case ends in one outcome, checked by outcome(): "clear" (SystemExit with a message, no
traceback), "ran" (the run went on and finished), "traceback" (any other exception) or "silent"
(it ran where it should have stopped). Cases on a user's files also check that every file is
byte-identical afterwards ("lost" otherwise).
"""
import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import clip.clip
import options
import runfolder
import train
from clip.files import atomic_write
from tests import synthetic
# one_thread and world are fixtures
from tests.synthetic import argv, interrupted, one_thread, snapshot, world  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outcome(call, capsys):
    """("clear", message), ("ran", None) or ("traceback", the exception's repr)."""
    capsys.readouterr()
    try:
        call()
    except SystemExit as e:
        text = (e.code if isinstance(e.code, str) else "") + capsys.readouterr().err
        return ("clear" if e.code and "Traceback" not in text else "traceback"), text
    except Exception as e:  # noqa: BLE001 (any other exception is a traceback for the user)
        return "traceback", repr(e)
    return "ran", None


# -- lost: a user's folder whose files merely carry run-file names ---------------------------------

@pytest.fixture(scope="module")
def colleague(world, tmp_path_factory):
    """A finished run of a colleague: its prompt_learner.pt and fewshot.json are real ones."""
    out = tmp_path_factory.mktemp("colleague") / "run"
    train.main(argv(world, out))
    return out


USER_FILES = {  # name -> bytes (None: a copy of the colleague's file of that name)
    "own config": {"config.json": b'{"lr": 0.1, "notes": "my own experiment"}\n'},
    "own config with a run's keys": {"config.json": b'{"method": "coop", "seed": 1}'},
    "colleague's checkpoint": {"prompt_learner.pt": None},
    "hand-edited shots": {"fewshot.json": None, "notes.txt": b"edited by hand\n"},
    "hand-edited shots alone": {"fewshot.json": None},
    "own .tmp file": {".mydata.tmp": b"precious"},
    "own .tmp file with a run file's name": {".config.json.tmp": b"precious"},
    "own log": {"log.txt": b"my log\n"},
    "own metrics": {"metrics.json": b'{"acc": 1}'},
    "own train_state": {"train_state.pt": b"not torch"},
    "all of them": {"config.json": b"[]", "prompt_learner.pt": None, "fewshot.json": None,
                    ".mydata.tmp": b"x"},
}


@pytest.mark.parametrize("case", USER_FILES)
def test_a_users_folder_is_refused_and_left_alone(world, colleague, tmp_path, capsys, case):
    out = tmp_path / "mine"
    out.mkdir()
    for name, content in USER_FILES[case].items():
        content = (colleague / name).read_bytes() if content is None else content
        (out / name).write_bytes(content)
    before = snapshot(out)
    kind, text = outcome(lambda: train.main(argv(world, out)), capsys)
    assert snapshot(out) == before, f"lost: {case}"
    assert kind == "clear" and "not a run folder" in text, (kind, text)


@pytest.mark.parametrize("name, deleted", [(".config.json.k3j_9x2a.tmp", True),
                                           (".prompt_learner.pt.abcdefgh.tmp", True),
                                           (".mydata.tmp", False), (".config.json.tmp", False),
                                           ("config.json.abcdefgh.tmp", False)])
def test_only_atomic_write_leftovers_go_from_a_run_folder(world, tmp_path, capsys, name, deleted):
    """In a run folder of ours, a kill's temporary files go; a user's .tmp files stay."""
    out = tmp_path / "run"
    interrupted(world, out)
    (out / name).write_bytes(b"left here")
    kind, _ = outcome(lambda: train.main(argv(world, out)), capsys)
    assert kind == "ran"
    assert (out / name).exists() != deleted, "lost" if deleted is False else "silent"


def test_an_empty_folder_becomes_a_run_folder(world, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert outcome(lambda: train.main(argv(world, out)), capsys)[0] == "ran"
    assert (out / "metrics.json").exists()


# -- file modes: what open() would give ------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o027])
def test_run_files_have_the_mode_open_gives(world, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        train.main(argv(world, out))
        with atomic_write(str(tmp_path / "direct.json")) as f:
            f.write("{}")
    finally:
        os.umask(old)
    paths = [tmp_path / "direct.json"] + [out / n for n in os.listdir(out)]
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    assert modes == {name: 0o666 & ~umask for name in modes}, "silent"


# -- checkpoints of another run in the folder ------------------------------------------------------

def other_root(tmp, classes):
    return synthetic.write_caltech101(str(tmp / "other"), classes, train=3, val=1, test=2)


FOREIGN = {  # how the foreign prompt_learner.pt is made: extra argv (and another data set)
    "another data set": dict(classes=["car", "tree", "boat", "lamp"]),
    "another method": dict(method="kgcoop"),
    "another seed": dict(extra=["--seed", "7"]),
    "other shapes": dict(extra=["--n_ctx", "2"]),
}


NOT_CHECKPOINTS = {"a list": [1, 2], "no tensors": {"method": "coop", "epoch": 1},
                   "epoch as text": dict(method="coop", config={}, classnames=[], epoch="1",
                                         state_dict={})}


@pytest.mark.parametrize("case", [*FOREIGN, *NOT_CHECKPOINTS])
def test_resume_refuses_another_runs_checkpoint(world, tmp_path, capsys, case):
    """train_state.pt damaged, prompt_learner.pt another run's: the run would go on from it."""
    out = tmp_path / "run"
    interrupted(world, out, epochs=1)
    if case in NOT_CHECKPOINTS:
        torch.save(NOT_CHECKPOINTS[case], out / "prompt_learner.pt")
    else:
        spec = FOREIGN[case]
        root = other_root(tmp_path, spec["classes"]) if "classes" in spec else world.root
        other = tmp_path / "other_run"
        args = argv(world, other, "coop", *spec.get("extra", []), root=root)
        args[1] = spec.get("method", "coop")
        train.main(args)
        (out / "prompt_learner.pt").write_bytes((other / "prompt_learner.pt").read_bytes())
    (out / "train_state.pt").write_bytes(b"\0" * 100)
    kind, text = outcome(lambda: train.main(argv(world, out)), capsys)
    assert kind == "clear" and "prompt_learner.pt" in text, (kind, text)


def test_resume_refuses_another_runs_train_state(world, tmp_path, capsys):
    """A readable train_state.pt with other learned tensors: refused, not loaded."""
    out = tmp_path / "run"
    interrupted(world, out, epochs=1)
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["learned"] = {k: torch.cat([v, v]) for k, v in state["learned"].items()}
    torch.save(state, out / "train_state.pt")
    kind, text = outcome(lambda: train.main(argv(world, out)), capsys)
    assert kind == "clear" and "train_state.pt" in text, (kind, text)


# -- option values inside the old range checks that crash later ------------------------------------

BAD_VALUES = [("--lr", "1e308"), ("--lr", "11"), ("--lr", "1e30"), ("--warmup_lr", "1e308"),
              ("--warmup_lr", "100"), ("--weight_decay", "1e308"), ("--weight_decay", "2"),
              ("--seed", str(2**32)), ("--seed", str(2**64)), ("--seed", "-1")]


@pytest.mark.parametrize("flag, value", BAD_VALUES)
def test_values_that_crash_later_are_refused_first(world, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    kind, text = outcome(lambda: train.main(argv(world, out, "coop", flag, value)), capsys)
    assert kind == "clear" and f"{flag} must be" in text, (kind, text)
    assert not out.exists(), "lost"


@pytest.mark.parametrize("flag, value", [("--lr", "10"), ("--warmup_lr", "10"),
                                         ("--weight_decay", "1"), ("--seed", str(2**32 - 1)),
                                         ("--seed", "0")])
def test_the_bounds_themselves_are_allowed(flag, value):
    cfg = options.parse_args(["--method", "coop", "--dataset", "toy", "--device", "cpu", flag,
                              value])
    assert str(cfg[flag[2:]]) == str(type(cfg[flag[2:]])(value))


def test_the_largest_seed_runs(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert outcome(lambda: train.main(argv(world, out, "coop", "--seed", str(2**32 - 1))),
                   capsys)[0] == "ran"


# -- the lock file ---------------------------------------------------------------------------------

def test_a_lock_that_is_a_folder(world, tmp_path, capsys):
    out = tmp_path / "run"
    interrupted(world, out)
    runfolder.unlock_run_folder(out)  # as a new process finds it: no lock held, .lock removed
    (out / ".lock").mkdir()
    kind, text = outcome(lambda: train.main(argv(world, out)), capsys)
    assert kind == "clear" and ".lock" in text and "folder" in text, (kind, text)


def test_a_full_disk_at_the_lock_pid_still_runs(world, tmp_path, capsys, monkeypatch):
    """The lock is the flock; its pid is only a courtesy, so ENOSPC writing it is no failure."""
    real, pid = os.write, str(os.getpid()).encode()

    def write(fd, data):
        if data == pid:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(os, "write", write)
    assert outcome(lambda: train.main(argv(world, tmp_path / "run")), capsys)[0] == "ran"


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_the_lock_file_cannot_be_made(world, tmp_path, capsys, monkeypatch, error):
    def fake_open(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(error, os.strerror(error), str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(runfolder, "open", fake_open, raising=False)
    kind, text = outcome(lambda: train.main(argv(world, tmp_path / "run")), capsys)
    assert kind == "clear" and ".lock" in text, (kind, text)


# -- Ctrl-C ----------------------------------------------------------------------------------------

INTERRUPT = """
import runpy, sys, torch
sys.path.insert(0, {repo!r})
def stop(*args, **kwargs):
    raise KeyboardInterrupt
{patch} = stop
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script, patch", [
    ("train.py", "torch.optim.SGD.step"),  # in the middle of training
    ("train.py", "torch.load"),  # while reading the CLIP weights
    ("eval.py", "torch.load"),
])
def test_ctrl_c_is_one_line_and_exit_130(world, tmp_path, script, patch):
    args = argv(world, tmp_path / "run")
    if script == "eval.py":
        args = ["--method", "zeroshot", "--dataset", "caltech101", "--root", world.root,
                "--model", world.model, "--out", str(tmp_path / "eval.json"), "--workers", "0"]
    code = INTERRUPT.format(repo=REPO, patch=patch, argv=[script] + args,
                            script=os.path.join(REPO, script))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert "Traceback" not in p.stderr, "traceback"
    assert p.returncode == 130 and "interrupted" in p.stderr, (p.returncode, p.stderr[-500:])


# -- a hand-edited config.json ---------------------------------------------------------------------

BAD_CONFIGS = {
    "a list": [], "a string": "coop", "a number": 3, "seed as text": {"seed": "1"},
    "shots as a float": {"shots": 2.5}, "protocol as a number": {"protocol": 3},
    "lr as text": {"lr": "fast"}, "precision as a list": {"precision": ["fp32"]},
    "a bool for a number": {"epochs": True},
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_hand_edited_config_is_named(world, tmp_path, capsys, case):
    out = tmp_path / "run"
    interrupted(world, out)
    path = out / "config.json"
    edit = BAD_CONFIGS[case]
    config = {**json.loads(path.read_text()), **edit} if isinstance(edit, dict) else edit
    path.write_text(json.dumps(config))
    before = snapshot(out)
    kind, text = outcome(lambda: train.main(argv(world, out)), capsys)
    assert kind == "clear" and str(path) in text, (kind, text)
    after = snapshot(out)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before, "lost"


# -- a full or mis-set CLIP_CACHE ------------------------------------------------------------------

def cache_case(tmp_path, monkeypatch, case):
    """Point CLIP_CACHE at the case's folder; _fetch (the network) fails as the case says."""
    calls = []

    def fetch(url, part):
        calls.append(url)
        if case == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        if case == "read-only":
            raise OSError(errno.EROFS, "Read-only file system")
        raise AssertionError("no download in this case")
    monkeypatch.setattr(clip.clip, "_fetch", fetch)
    monkeypatch.setattr(clip.clip, "RETRY_DELAY", 0)
    cache = tmp_path / "cache"
    if case == "a file":
        cache.write_bytes(b"not a folder")
    elif case == "under a file":
        cache.write_bytes(b"not a folder")
        cache = cache / "clip"
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    return calls


@pytest.mark.parametrize("case", ["full", "read-only", "a file", "under a file"])
def test_clip_cache_problems_name_clip_cache(world, tmp_path, capsys, monkeypatch, case):
    calls = cache_case(tmp_path, monkeypatch, case)
    args = argv(world, tmp_path / "run")
    args[args.index("--model") + 1] = "ViT-B/16"
    kind, text = outcome(lambda: train.main(args), capsys)
    assert kind == "clear" and "CLIP_CACHE" in text, (kind, text)
    assert len(calls) <= 1, "retried a local error"  # a full disk does not get better by retrying
    assert not (tmp_path / "run").exists()
