"""A fork's whole job: one file in prompts/ and one registry line. The file is the
README's example, as printed.

The "Adding a method" code block of README.md is written to a module, registered in
prompts.METHODS, and must then train, save, evaluate with eval.py, show its options in --help and
learn only its own tensors.
"""
import importlib.util
import json
import os
import re

import pytest
import torch

import eval as eval_py
import options
import prompts
import train
# one_thread is a fixture
from tests.synthetic import one_thread, save_tiny_clip, write_folder  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example():
    """The first python block after the "## Adding a method" heading."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Adding a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def vpt(tmp_path, monkeypatch):
    path = tmp_path / "vpt.py"
    path.write_text(readme_example())
    spec = importlib.util.spec_from_file_location("vpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(prompts.METHODS, "vpt", module)  # the one registry line
    return module


def test_readme_method_trains_saves_and_evaluates(vpt, tmp_path):
    model = save_tiny_clip(tmp_path / "tiny.pt")
    folder = write_folder(tmp_path / "images", ["cat", "dog", "fish", "bird"], per_class=6)
    out = tmp_path / "run"
    metrics = train.main(["--method", "vpt", "--dataset", f"folder:{folder}", "--model", model,
                          "--out", str(out), "--workers", "0", "--shots", "2", "--batch_size", "2",
                          "--epochs", "2"])
    assert set(metrics) == {"base_acc", "novel_acc", "hm"}
    ckpt = torch.load(out / "prompt_learner.pt", weights_only=True)
    assert ckpt["method"] == "vpt"
    assert {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()} == {"vision_prompts": (2, 4,
                                                                                             64)}
    result = eval_py.main(["--ckpt", str(out / "prompt_learner.pt"), "--dataset",
                           f"folder:{folder}", "--subsample", "new", "--workers", "0", "--out",
                           str(tmp_path / "eval.json")])
    assert result["accuracy"] == metrics["novel_acc"]  # the same prompts on the same novel classes
    with open(out / "config.json") as f:
        assert json.load(f)["n_ctx_vision"] == 4


def test_readme_method_learns_only_its_prompts(vpt, tmp_path):
    clip_model = train.load_frozen_clip(save_tiny_clip(tmp_path / "tiny.pt"), "cpu")
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    model = prompts.build("vpt", clip_model, ["cat", "dog"], "a photo of a {}.", dict(vpt.DEFAULTS))
    model.train()
    loss = model.loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["vision_prompts"]
    assert model.vision_prompts.grad.abs().sum() > 0
    assert all(torch.equal(v, clip_model.state_dict()[k]) for k, v in before.items())


def test_readme_method_in_help(vpt, capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--method", "vpt", "--help"])
    assert "--n_ctx_vision" in capsys.readouterr().out


def test_readme_method_in_bench(vpt, tmp_path):
    """bench.py takes its methods from the registry: the new one's train-step row runs."""
    import bench

    clip_model = train.load_frozen_clip(save_tiny_clip(tmp_path / "tiny.pt"), "cpu")
    (row,) = bench.train_step_rows(clip_model, ["vpt"], [3], "cpu", repeat=1)
    assert row[0] == "train step vpt, 3 classes, batch 4"
