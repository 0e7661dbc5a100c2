"""train.py's CUDA-graph step (--cuda_graphs): the bookkeeping everywhere, with a stand-in for the
graph that replays the step's Python; the real capture where a GPU exists (MMPROMPT_TEST_GPU=1 lets
the tests see it: conftest hides GPUs otherwise)."""
import types

import pytest
import torch

import prompts
import speed
import train
from tests.synthetic import one_thread  # noqa: F401 (a fixture)
from tests.tiny import tiny_clip, tiny_config, tiny_train_step

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSNAMES = ["cat", "dog", "sea lion", "hot air balloon"]


class ReplayedInPython(speed.GraphedStep):
    """GraphedStep with the CUDA parts replaced: 'capturing' records nothing and computes
    nothing, as a real capture, and a 'replay' runs the step on the static inputs and writes
    into the same outputs."""
    captures = 0
    fail = False

    def side_stream(self, images, labels):
        return self.step(images, labels)

    def capture(self, images, labels):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        self.images, self.labels = images.clone(), labels.clone()
        self.outputs = None

        def replay():
            new = self.step(self.images, self.labels)
            if self.outputs is None:
                self.outputs = {k: torch.empty_like(v) for k, v in new.items()}
            for k, v in new.items():
                self.outputs[k].copy_(v)
        self.graph = types.SimpleNamespace(replay=replay)


def learned_after(graphs, method="maple", fail=False, required=False):
    """The learned tensors after two epochs of 3 batches (4, 4, then a partial 2) at two lrs; with
    graphs, the step is ReplayedInPython. Returns (learned state, the step, the losses seen)."""
    torch.manual_seed(0)
    model, optimizer, step = tiny_train_step(method, CLASSNAMES, lr=1e-2)
    if graphs:
        step = ReplayedInPython(step, optimizer, required)
        step.fail = fail
    g = torch.Generator().manual_seed(1)
    losses = []
    for lr in (1e-2, 5e-3):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for n in (4, 4, 2):
            images, labels = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,),
                                                                                   generator=g)
            losses.append(float(step(images, labels)["loss"]))
    return prompts.common.learned_state(model), step, losses


def test_a_replayed_step_learns_what_the_eager_one_does():
    """2 warm-up steps, then a capture per lr (2 in all); the partial batches of 2 run eagerly. Same
    tensors, bit for bit, when the replay is the step itself: the bookkeeping loses no step and
    feeds each replay its own batch."""
    eager, _, eager_losses = learned_after(graphs=False)
    graphed, step, losses = learned_after(graphs=True)
    assert step.captures == 2
    assert losses == eager_losses
    assert eager.keys() == graphed.keys() and all(torch.equal(eager[k], graphed[k]) for k in eager)


def test_a_step_that_cannot_be_captured_runs_eagerly_under_auto(capsys):
    eager, _, _ = learned_after(graphs=False)
    graphed, step, _ = learned_after(graphs=True, fail=True)
    assert step.eager and step.captures == 0
    assert "could not be captured as a CUDA graph" in capsys.readouterr().err
    assert all(torch.equal(eager[k], graphed[k]) for k in eager)
    with pytest.raises(RuntimeError, match="capturing"):  # --cuda_graphs on: no silent fallback
        learned_after(graphs=True, fail=True, required=True)


def test_cuda_graphs_on_is_refused_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "coop", "--dataset", "toy", "--cuda_graphs", "on",
                    "--root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert "--cuda_graphs on needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (MMPROMPT_TEST_GPU=1)")
@pytest.mark.parametrize("method", list(prompts.METHODS))
def test_the_cuda_graph_learns_what_eager_bf16_does(method):
    """On a GPU, bf16 with the frozen matrices cast once: 6 steps captured and replayed vs eager.
    The same tensors to bf16 rounding (replay order of kernels may differ in the last bit)."""
    results = []
    for graphs in ("off", "on"):
        torch.manual_seed(0)
        cfg = tiny_config(method, device="cuda", precision="bf16", cuda_graphs=graphs)
        clip_model = speed.keep_in_precision(tiny_clip().requires_grad_(False).cuda(), cfg)
        model = prompts.build(method, clip_model, CLASSNAMES, "a photo of a {}.", cfg)
        model.set_stage(model.stages(cfg)[-1][0])
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        step = train.train_step(model, optimizer, cfg)
        assert isinstance(step, speed.GraphedStep) == (graphs == "on")
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            step(torch.randn(4, 3, 32, 32, generator=g).cuda(),
                 torch.randint(0, 4, (4,), generator=g).cuda())
        results.append({k: v.float().cpu() for k, v in prompts.common.learned_state(model).items()})
    eager, graphed = results
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=2 ** -7, atol=1e-5, msg=k)
