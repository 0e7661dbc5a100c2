"""No host sync inside a training step: on a GPU each one drains the launch queue (measure.HostSyncs
says which ops). Counted on the CPU, where the same ops are dispatched: every registered method's
step, and train.py's loop over a whole toy run."""

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.data.dataloader import _BaseDataLoaderIter

import options
import prompts
import train
from measure import HostSyncs
from tests.synthetic import one_thread  # noqa: F401 (a fixture)
from tests.tiny import tiny_train_step

pytestmark = pytest.mark.usefixtures("one_thread")
# several prompt lengths: several buckets
CLASSNAMES = ["cat", "dog", "sea lion", "hot air balloon", "a"]


def test_the_counter_sees_a_read_back():
    x = torch.ones(3)
    with HostSyncs() as syncs:
        float(x.sum()), bool(x[0] > 0), x[x > 0], torch.unique_consecutive(x)
    assert syncs.ops == {"_local_scalar_dense": 2, "index": 1, "unique_consecutive": 1}


@pytest.mark.parametrize("method", list(prompts.METHODS))
def test_a_train_step_reads_nothing_back(method):
    """Batch 4 in the method's last stage (everything it defines learns), after one warm-up step
    (what a method makes once, e.g. PromptSRC's teacher features, may read back then)."""
    model, _, step = tiny_train_step(method, CLASSNAMES, lr=1e-3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 4])
    step(images, labels)
    with HostSyncs() as syncs:
        losses = step(images, labels)
    assert syncs.count == 0, dict(syncs.ops)
    assert set(losses) == {"loss", *model.loss_terms} and all(v.dim() == 0 for v in losses.values())


def test_the_training_loop_reads_back_once_an_epoch(tmp_path, monkeypatch, capsys):
    """A toy run of PMPO (12 steps an epoch): at most 0.1 read-backs per step, data
    loading and evaluation excluded (the crops' random draws are CPU numbers; evaluation
    reads its count back once)."""
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "cache"))
    steps, syncs, counting = [], HostSyncs(), []  # counting: non-empty while train() counts
    loading = ((torch.utils.data.DataLoader, "__iter__"), (_BaseDataLoaderIter, "__next__"))
    for cls, name in loading:  # data loading: the sampler's seed and order, the crops' random boxes
        monkeypatch.setattr(cls, name, uncounted(getattr(cls, name), counting))
    tolist = torch.Tensor.tolist  # a read-back the dispatcher does not see on a CPU: count it here

    def counted_tolist(self):
        if counting and counting[-1]:
            syncs.ops["tolist"] += 1
        return tolist(self)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    real_train, real_step = train.train, train.train_step

    def counted_train(*args, **kwargs):
        counting.append(True)
        try:
            with syncs:
                return real_train(*args, **kwargs)
        finally:
            counting.pop()

    def counting_step(*args):
        step = real_step(*args)
        return lambda images, labels: steps.append(1) or step(images, labels)
    monkeypatch.setattr(train, "train", counted_train)
    monkeypatch.setattr(train, "train_step", counting_step)
    train.main(["--method", "pmpo", "--dataset", "toy", "--root", str(tmp_path / "data"),
                "--out", str(tmp_path / "run")])
    epochs = options.settings("pmpo", "toy", {})["epochs"]
    print(f"{syncs.count} read-backs over {len(steps)} steps: {dict(syncs.ops)}")
    assert len(steps) >= 10 * epochs  # an epoch is long enough for the figure to mean something
    assert syncs.count <= 0.1 * len(steps)


def uncounted(fn, counting):
    """fn, with neither the dispatcher's counter nor the tolist one counting inside it."""
    def call(*args, **kwargs):
        counting.append(False)
        try:
            with _disable_current_modes():
                return fn(*args, **kwargs)
        finally:
            counting.pop()
    return call
