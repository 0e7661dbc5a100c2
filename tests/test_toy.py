"""The built-in toy world: the README's quick-start command, run as written,
and the world's promises.

The quick start runs in a fresh folder with an empty CLIP cache and no $DATA, as on a new machine:
it reads the shipped toy CLIP and draws the data set itself. The other tests reuse what it drew. No
test here depends on the CPU's kernels: the shipped file is read, not built, and zero-shot CLIP's
accuracies on it are the same under AVX-512, AVX2 and scalar kernels (its logits differ in the last
bits, never in their argmax here).
"""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import clip
import data
import eval as eval_py
import options
import prompts
import train
from clip import toy
from tests.synthetic import one_thread  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_START = ["train.py", "--method", "pmpo", "--dataset", "toy"]  # exactly the README's command
MARGIN = 10.0  # points PMPO gains on base over zero-shot in the shipped world (README: about 23)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fresh_clone")
    cache = tmp_path_factory.mktemp("empty_cache")
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "CLIP_CACHE")}
    env.update(CLIP_CACHE=str(cache), PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, os.path.join(REPO, QUICK_START[0]), *QUICK_START[1:]],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(cwd=cwd, cache=cache, root=str(cwd / "data_root"), result=done,
                           run=cwd / "runs" / "toy" / "pmpo" / "base2novel" / "shots16_seed1")


def zeroshot(root):
    """Zero-shot CLIP on the toy world, as eval.py --benchmark toy computes it."""
    cfg = options.config("coop", "toy", device="cpu", root=root)  # the toy's eval settings
    return train.zeroshot_metrics(train.load_frozen_clip("toy", "cpu"),
                                  train.read_dataset("toy", root), cfg)


def readme_table():
    """The rows of the README's toy table, under its header: method -> cells."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## Quick start")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_quick_start_runs_as_written(world):
    out = world.result.stdout + world.result.stderr
    assert world.result.returncode == 0, out[-3000:]
    with open(world.run / "metrics.json") as f:
        metrics = json.load(f)
    assert set(metrics) == {"base_acc", "novel_acc", "hm"}
    assert (
        f"base_acc {metrics['base_acc']:.2f}  novel_acc "
        f"{metrics['novel_acc']:.2f}  hm {metrics['hm']:.2f}"
        in out
    )
    with open(world.run / "config.json") as f:
        config = json.load(f)
    assert config["model"] == "toy" and config["clip_sha256"] == toy.SHIPPED_SHA256
    # nothing built or downloaded: the toy CLIP is read from the repository
    assert os.listdir(world.cache) == []


def test_quick_start_prints_its_yardstick_and_folder(world, one_thread):
    """Zero-shot CLIP on the same split beside the run's numbers, and where the run is."""
    zs = zeroshot(world.root)
    expected = "  ".join(f"{k} {v:.2f}" for k, v in zs.items())
    assert f"zero-shot CLIP on the same test images: {expected}" in world.result.stdout
    assert (
        f"run folder: {os.path.join('runs', 'toy', 'pmpo', 'base2novel', 'shots16_seed1')}"
        in world.result.stdout
    )


def test_shipped_toy_clip_is_the_pinned_file():
    assert toy.file_sha256(toy.SHIPPED) == toy.SHIPPED_SHA256
    # a few MB at most: only the rows pre-training moved
    assert os.path.getsize(toy.SHIPPED) < 4_000_000


def test_load_toy_reads_the_file(one_thread):
    """clip.load("toy") = the file's tensors, and the filler for every
    token-embedding row it does not hold."""
    model, _ = clip.load("toy", device="cpu")
    packed = toy.read(toy.SHIPPED)
    state = model.state_dict()
    for name, tensor in packed.items():
        if name not in toy.PACKED:
            assert torch.equal(state[name], tensor), name
    ids, rows = packed[toy.PACKED[0]], packed[toy.PACKED[1]]
    weight = state["token_embedding.weight"]
    assert torch.equal(weight[ids], rows)
    others = torch.ones(len(weight), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(weight[others], toy.filler_rows()[others])
    captions = clip.tokenize([c.format(n) for c in toy.CAPTIONS for n in toy.CLASSNAMES])
    # every caption token was learned
    assert set(torch.unique(captions).tolist()) <= set(ids.tolist())


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "toy_clip.npz"
    damaged.write_bytes(open(toy.SHIPPED, "rb").read() + b"\0")
    monkeypatch.setattr(toy, "SHIPPED", str(damaged))
    with pytest.raises(RuntimeError, match="not the pinned"):
        clip.load("toy", device="cpu")


def test_pack_unpack_round_trip(one_thread):
    model, _ = clip.load("toy", device="cpu")
    state = model.state_dict()
    again = toy.unpack(toy.pack(state))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_build_says_whether_it_is_the_shipped_file(tmp_path, monkeypatch, capsys, one_thread):
    """--build's two outcomes, on a 2-step pre-training (the real one takes 300 steps, and its
    result depends on the CPU's kernels, which is why the file is shipped)."""
    monkeypatch.setitem(toy.PRETRAIN, "steps", 2)
    out = str(tmp_path / "built.npz")
    assert not toy.build(out)
    assert "NOT the shipped" in capsys.readouterr().out
    first = open(out, "rb").read()
    # the same 2 steps again: the same weights, bit for bit
    monkeypatch.setattr(toy, "SHIPPED", out)
    assert toy.build(str(tmp_path / "again.npz"))
    assert "the same weights as the shipped" in capsys.readouterr().out
    assert toy.read(str(tmp_path / "again.npz")).keys() == toy.read(out).keys() and first


def test_readme_zeroshot_row_is_what_eval_computes(world, one_thread):
    """The README's toy table starts with zero-shot CLIP on the shipped file: to
    the last printed digit."""
    zs = zeroshot(world.root)
    assert readme_table()["zeroshot"] == ["1", f"{zs['base_acc']:.2f}", f"{zs['novel_acc']:.2f}",
                                          f"{zs['hm']:.2f}"]


def readme_methods():
    """The methods the README's first table presents, by file (`prompts/<method>.py`): the
    project's own, not a fork's new one, which the README's recipe does not add there."""
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"`prompts/(\w+)\.py`", f.read().split("\n## ")[0])


@pytest.mark.whole_registry
def test_readme_table_has_every_method_above_zeroshot_on_base():
    """The toy table the README shows: three seeds of every method the README presents, each above
    zero-shot CLIP on base, and no row for a method that is not registered."""
    table = readme_table()
    zeroshot_base = float(table.pop("zeroshot")[1])
    assert set(table) == set(readme_methods()) - {"zeroshot"} and set(table) <= set(prompts.METHODS)
    for method, (seeds, base, _, _) in table.items():
        assert seeds == "3" and float(base.split(" ± ")[0]) >= zeroshot_base, method


def test_world_is_a_folder_data_set(world):
    """Written in the folder: layout (class folders + split.json), so folder:PATH
    reads the same data set."""
    toy_ds = data.build_dataset("toy", world.root)
    folder_ds = data.build_dataset(f"folder:{os.path.join(world.root, 'toy')}")
    assert toy_ds.classnames == folder_ds.classnames == sorted(toy.CLASSNAMES)
    assert [d.impath for d in toy_ds.test] == [d.impath for d in folder_ds.test]
    assert len(toy_ds.classnames) // 2 >= 10  # at least 10 base and 10 novel classes


def test_zeroshot_above_chance_and_below_perfect(world, one_thread):
    chance = 100 / (len(toy.CLASSNAMES) // 2)  # each half is classified among its own 12 classes
    zs = zeroshot(world.root)
    for key in ("base_acc", "novel_acc"):
        assert 3 * chance <= zs[key] <= 90, (key, zs[key])


def test_prompt_learning_beats_zeroshot_on_base(world, one_thread):
    """By a margin far above what other CPU kernels move a fine-tuning (0 on
    the scalar ones here)."""
    with open(world.run / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["base_acc"] >= zeroshot(world.root)["base_acc"] + MARGIN


def test_same_seed_same_metrics_in_another_process(world, tmp_path, one_thread):
    """The subprocess ran with torch's default threads, this one with one: same
    metrics to the last digit."""
    metrics = train.main(["--method", "pmpo", "--dataset", "toy", "--root", world.root, "--out",
                          str(tmp_path / "again")])
    with open(world.run / "metrics.json") as f:
        assert metrics == json.load(f)


def test_rerun_with_another_clip_is_refused(world, tmp_path, one_thread):
    """A finished run made with another CLIP file: the message says so, and which CLIP each was."""
    out = tmp_path / "run"
    os.makedirs(out)
    (out / ".run_folder").touch()  # a run folder of train.py's, made with another CLIP
    with open(world.run / "config.json") as f:
        config = json.load(f)
    for name, content in (("config.json", {**config, "clip_sha256": "0" * 64}),
                          ("metrics.json", dict(base_acc=1.0, novel_acc=1.0, hm=1.0))):
        with open(out / name, "w") as f:
            json.dump(content, f)
    with pytest.raises(SystemExit, match=f"made with another CLIP \\(sha256 {'0' * 64}; toy now is "
                                         f"{toy.SHIPPED_SHA256}\\)"):
        train.main(["--method", "pmpo", "--dataset", "toy", "--root", world.root, "--out",
                    str(out)])


def test_benchmark_refuses_runs_of_another_clip(world, tmp_path):
    """Today's table is never another toy CLIP's reprinted: a folder of an older
    CLIP stops the benchmark."""
    folder = tmp_path / "bench" / "coop" / "base2novel" / "shots16_seed2"
    os.makedirs(folder)
    (folder / ".run_folder").touch()  # a run folder of train.py's
    with open(folder / "config.json", "w") as f:
        # before sha256s were recorded
        json.dump(dict(method="coop", dataset="toy", model="toy", protocol="base2novel", shots=16,
                       seed=2), f)
    with pytest.raises(SystemExit,
                       match=re.escape(f"{folder} was made with another "
                                       f"CLIP (sha256 not recorded")):
        eval_py.main(["--benchmark", "toy", "--root", world.root, "--out", str(tmp_path / "bench")])
    assert not os.path.exists(tmp_path / "bench" / "zeroshot")  # refused before any run


@pytest.mark.whole_registry
def test_real_data_path_untouched():
    """--dataset caltech101 gets the ViT-B/16 defaults, not the toy's."""
    for method in prompts.METHODS:
        assert options.settings(method, "caltech101", {}) == options.settings(method, "folder:/x",
                                                                              {})
    cfg = options.parse_args(["--method", "pmpo", "--dataset", "caltech101"])
    epochs = prompts.METHODS["pmpo"].DEFAULTS["epochs"]
    assert cfg["model"] == "ViT-B/16" and cfg["epochs"] == epochs


def test_picture(tmp_path):
    from PIL import Image

    from data.toy import picture

    path = picture(str(tmp_path / "world.png"))
    with Image.open(path) as img:
        assert img.size[0] > 2 * 10 * toy.IMAGE_SIZE and img.size[1] > 12 * toy.IMAGE_SIZE


def test_clip_snippet_prints_what_its_page_says(capsys):
    """docs/clip.md's first example (linked from the README), run as printed, prints what the page
    shows: the shipped toy CLIP's answer."""
    with open(os.path.join(REPO, "docs", "clip.md")) as f:
        section = f.read()
    code = section[section.index("```python\n") + 10:section.index("```\n\nIt prints")]
    printed = section[section.index("It prints `") + 11:].split("`")[0]
    exec(compile(code, "docs/clip.md", "exec"), {})
    assert capsys.readouterr().out.strip() == printed


def test_help_on_the_toy_world_shows_its_values(capsys):
    """`train.py --method M --dataset toy --help` shows the values a toy
    run uses, not ViT-B/16's."""
    with pytest.raises(SystemExit):
        options.parse_args(["--method", "pmpo", "--dataset", "toy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    toy = {**options.TOY, **prompts.toy_defaults("pmpo")}
    assert f"--epochs EPOCHS training epochs (default: {toy['epochs']};" in text  # then its bounds
    assert f"(default: {toy['model']})" in text and f"(default: {toy['threads']};" in text
    assert (
        "--device DEVICE cpu, cuda, cuda:1, mps (default: cuda if a GPU "
        "is seen, else cpu; here: cpu)"
        in text
    )
