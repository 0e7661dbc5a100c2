"""eval.py --benchmark against a hostile user: a round that torchrun starts again after a worker was
killed finishes."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import data
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


WORKER = """
    import os, signal, sys, threading
    sys.path.insert(0, {repo!r})
    import console, eval as eval_py, reproduce

    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        perform = reproduce.perform

        def killed(job, *args):  # as kill -9 would, a second into its first run
            if job.kind == "train":
                threading.Timer(1, os.kill, (os.getpid(), signal.SIGKILL)).start()
            return perform(job, *args)

        reproduce.perform = killed
    with console.interrupted():
        eval_py.main(sys.argv[1:])
"""


def test_a_round_torchrun_restarts_after_a_killed_worker_finishes(root, tmp_path):
    """torchrun --max-restarts 1, the second worker killed in its first run: the next round resumes
    the runs and prints the table; it neither hangs nor fails to connect."""
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
