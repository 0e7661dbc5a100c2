"""bench.py's arithmetic: every row divides the time it measured by the work it did. A fake clock
makes each timed call last exactly one second, so each figure is known in advance."""
import itertools
import types

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import measure
import prompts
from bench_data import bench_classnames
from clip.tokenizer import tokenize
from tests.synthetic import one_thread  # noqa: F401 (a fixture)
from tests.tiny import tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_second_per_call(monkeypatch):
    ticks = itertools.count()
    monkeypatch.setattr(measure, "time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip().requires_grad_(False)


def test_agreement_rows_count_every_image(clip_model):
    """30 images in batches of 8 (the last one 6): all 30 are compared, none cut, no
    crash below one batch."""
    for n_images, batch in ((30, 8), (5, 250)):
        rows = dict(bench.agreement_rows(clip_model, "cpu", n_images=n_images, n_classes=7,
                                         batch=batch))
        assert f"fast vs plain, {n_images} images: image features, min cosine" in rows
        assert "fast vs plain, 7 prompts: text features, min cosine" in rows
        assert float(rows[f"fast vs plain, {n_images} images: image features, min cosine"]) > 0.9999
    buckets = [v for k, v in rows.items() if k.startswith("length buckets vs "
                                                          "all 77 positions, 7 prompts")]
    # two attention kernels
    assert len(buckets) == 2 and all(float(v.split(",")[0]) < 1e-6 for v in buckets)


def test_augment_row_divides_by_the_batches_fetched(one_second_per_call):
    (row,) = bench.augment_rows("cpu", 32, images=10, batch=4, repeat=1)
    assert row[0].startswith("train batch of 4: crop + resize + flip, 3 batches from 10 ")
    assert row[1] == row[4] == "333.33 ms"  # one second for 3 batches (4 + 4 + 2 images)


def test_timed_paths_take_turns():
    """Each round calls every fn once, in turn, so a slow spell of the
    machine falls on all of them."""
    calls = []
    results = measure.timed([lambda: calls.append("plain"), lambda: calls.append("fast")], "cpu",
                          repeat=3, warmup=1)
    assert calls == ["plain", "fast"] * 4 and len(results) == 2


def fake_probes(rate_of):
    """matmul_probes with one product per precision that does nothing and counts rate_of(dtype)
    FLOPs: under the fake clock it lasts one second, so that precision's measured rate is
    rate_of(dtype) FLOP/s."""
    return lambda device, dtype: [(lambda: None, rate_of(dtype))]


def test_train_step_row_uses_each_paths_rate(one_second_per_call, monkeypatch, clip_model):
    monkeypatch.setattr(bench, "count_flops", lambda fn: 1e9)
    # the two paths' precisions differ
    monkeypatch.setattr(measure, "fast_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(measure, "matmul_probes",
                        fake_probes(lambda dtype: 4e9 if dtype == torch.bfloat16 else 1e9))
    (row,) = bench.train_step_rows(clip_model, ["coop"], [3], "cpu", repeat=1)
    batch = prompts.METHODS["coop"].DEFAULTS["batch_size"]  # each method at its own batch
    assert row[0] == f"train step coop, 3 classes, batch {batch}"
    assert row[1] == row[4] == "1000.0 ms"
    # floor: 1 s at the plain rate, 0.25 s at the fast one
    assert (row[3], row[6]) == ("1.00x", "4.00x")
    assert row[7:] == ["0", "n/a", "n/a"]  # no host sync in the step; no GPU to profile


def test_train_step_floor_counts_a_step_after_the_first(one_second_per_call, monkeypatch):
    """PromptSRC's first step also computes frozen CLIP's class features over 60 templates, kept
    for every later step: the floor counts a later step, else a row would sit below its floor."""
    clip_model = tiny_clip(vision_layers=9, transformer_layers=9).requires_grad_(False)  # depth 9
    counted = []
    monkeypatch.setattr(bench, "count_flops",
                        lambda fn: counted.append(measure.count_flops(fn)) or counted[-1])
    monkeypatch.setattr(measure, "matmul_probes", fake_probes(lambda dtype: 1e9))
    list(bench.train_step_rows(clip_model, ["promptsrc"], [3], "cpu", repeat=1))
    cfg = bench.config("promptsrc", "cpu", precision="fp32", cuda_graphs="off")  # the plain path
    step = bench.make_step(clip_model, 3, cfg)
    images, labels = torch.randn(cfg["batch_size"], 3, 32, 32), torch.tensor([0, 1, 2, 0])
    first, later = (measure.count_flops(lambda: step(images, labels)) for _ in range(2))
    assert first > 5 * later and counted == [later]


def test_rate_is_measured_in_the_rows_own_rounds(monkeypatch):
    """The matmul products take their turn in each round of the row they rate,
    after the row's own fns."""
    calls = []
    monkeypatch.setattr(measure, "matmul_probes", lambda device,
                        dtype: [(lambda: calls.append("probe"), 1.0)])
    seconds, rates = measure.rated([lambda: calls.append("row")], "cpu", repeat=2)
    assert calls == ["row", "probe"] * 3  # a warm-up round, then two timed ones
    assert len(seconds) == 1 and rates[False] == rates[True] > 0  # a CPU runs both paths in float32


def test_text_rows_floor_is_each_prompts_own_length(one_second_per_call, monkeypatch, clip_model):
    n = 9
    text = tokenize([f"a photo of a {name}." for name in bench_classnames(n)])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for t in text:  # each prompt alone, cut at its own end-of-text token
            clip_model.encode_text(t[None])
    floor_flops = counter.get_total_flops()
    # floor: 0.4 s
    monkeypatch.setattr(measure, "matmul_probes", fake_probes(lambda dtype: 2.5 * floor_flops))
    (row,) = bench.text_rows(clip_model, "cpu", prompt_counts=(n,), repeat=1)
    lengths = text.argmax(-1) + 1
    assert row[0] == (f"text forward, {n} class prompts ({lengths.float().mean():.1f} tokens on "
                      f"average, longest {lengths.max()})")
    # all 77 positions, batch cut, length buckets: 1 s each
    assert row[1::3] == [f"{n} prompts/s"] * 3
    assert row[3::3] == ["2.50x"] * 3


def test_flops_count_forward_and_backward_like_torchs_counter(clip_model):
    """measure.Flops (train steps that learn, no module tracker) against torch's FlopCounterMode."""
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    def step():
        clip_model.encode_image(x).sum().backward()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    assert measure.count_flops(step) == counter.get_total_flops() > 0


def test_the_rows_are_printed_as_they_are_measured(capsys):
    def rows():
        yield ["a", "1"]
        assert "| a | 1 |" in capsys.readouterr().out  # printed before the next one is measured
        yield ["b"]
    assert bench.print_rows(["name", "value"], rows()) == [["a", "1"], ["b", ""]]


def test_a_device_this_machine_lacks_is_refused(capsys):
    for device in ("cuda", "tpu", ""):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", "--device", device])
        assert "--device" in capsys.readouterr().err
