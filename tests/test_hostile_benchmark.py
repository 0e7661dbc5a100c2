"""eval.py --benchmark against a hostile user: damaged run folders fail their own run and the others
go on, a stdout that cannot be written is one error line, and a round that torchrun starts again
after a worker was killed finishes."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import data
import eval as eval_py
import runfolder
from tests.synthetic import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ["1", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The toy world's data root: drawn by the first benchmark that reads it."""
    return str(tmp_path_factory.mktemp("toy_root"))


def argv(root, out):
    return ["--benchmark", "toy", "--methods", "coop", "--seeds", *SEEDS, "--root", root, "--out",
            str(out), "--device", "cpu", "--", "--epochs", "1"]


def folder(out, seed):
    return os.path.join(str(out), "coop", "base2novel", f"shots16_seed{seed}")


def denied(monkeypatch, inside):
    """What a user other than root meets where `inside` (a path, or a folder and all in it) may not
    be opened or written (chmod 000 or 555): tests run as root, whom chmod does not stop."""
    real_open, real_access = open, os.access

    def opened(path, *args, **kwargs):
        if os.path.abspath(path).startswith(inside):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runfolder, "open", opened, raising=False)  # the lock's and its pid's opens
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        not os.path.abspath(path).startswith(inside) and real_access(path, mode, **kw)))


def run_folder(run):
    """A run folder as train.py makes it (marked), to be damaged."""
    runfolder.make_run_folder(run)


def lock_is_a_folder(run, monkeypatch):
    run_folder(run)
    os.makedirs(os.path.join(run, ".lock"))


def folder_is_a_file(run, monkeypatch):
    os.makedirs(os.path.dirname(run))
    with open(run, "w") as f:
        f.write("not a run\n")


def lock_cannot_be_opened(run, monkeypatch):
    run_folder(run)
    open(os.path.join(run, ".lock"), "w").close()
    denied(monkeypatch, os.path.join(os.path.abspath(run), ".lock"))


def folder_is_read_only(run, monkeypatch):
    run_folder(run)
    denied(monkeypatch, os.path.abspath(run))


@pytest.mark.parametrize("damage", [lock_is_a_folder, folder_is_a_file, lock_cannot_be_opened,
                                    folder_is_read_only])
def test_a_damaged_run_folder_fails_its_run_and_the_others_go_on(damage, root, tmp_path,
                                                                  monkeypatch, capsys):
    out = tmp_path / "bench"
    damage(folder(out, 1), monkeypatch)
    with pytest.raises(SystemExit) as stop:
        eval_py.main(argv(root, out))
    printed = capsys.readouterr()
    assert stop.value.code == 1 and "Traceback" not in printed.err
    assert f"failed: {folder(out, 1)}: " in printed.err
    assert "side by side" in printed.out  # the table, of the runs that could be done
    for other in (folder(out, 2), os.path.join(out, "zeroshot", "base2novel", "shots16_seed1")):
        assert runfolder.finished(other)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("before", ["nothing", "every run"])
def test_a_full_stdout_is_one_error_line(before, root, tmp_path, capsys):
    """`eval.py --benchmark toy > /dev/full`: refused before any run, or (every run saved already)
    when the table is printed; either way one line on stderr and exit code 1."""
    out = tmp_path / "bench"
    if before == "every run":
        eval_py.main(argv(root, out))
        capsys.readouterr()
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "eval.py", *argv(root, out)], cwd=REPO,
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith("error: could not write to stdout: No space left on device")
    assert os.path.exists(out) == (before == "every run")  # nothing was run that would print


WORKER = """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import console, eval as eval_py, train

    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        def killed(*args, **kwargs):  # as kill -9 would, its run's epoch saved, the lock held
            os.kill(os.getpid(), signal.SIGKILL)

        train.evaluate = killed
    with console.interrupted():
        eval_py.main(sys.argv[1:])
"""


def test_a_round_torchrun_restarts_after_a_killed_worker_finishes(root, tmp_path):
    """torchrun --max-restarts 1, the second worker killed in its first run (as it evaluates): the
    next round resumes the runs and prints the table; it neither hangs nor fails to connect."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(repo=REPO)))
    out = tmp_path / "bench"
    data.build_dataset("toy", root)  # the toy world drawn once, not by two processes at once
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--max-restarts", "1", str(script), *argv(root, out)], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # its workers too: they run in sessions of their own
        with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
            for pid in [*map(int, f.read().split()), launcher.pid]:
                os.kill(pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("the round torchrun started again never finished")
    assert "exitcode: -9" in stderr  # the worker was killed, and the round started again
    assert launcher.returncode == 0, stderr[-3000:]
    assert "| coop, epochs 1 | 2 |" in stdout
    assert all(runfolder.finished(folder(out, seed)) for seed in SEEDS)
