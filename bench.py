"""Speed and memory of training and evaluation, plain path vs fast path, against the FLOP floor.

    python bench.py                      # on a GPU: ViT-B/16-sized random weights, the full table
    python bench.py --tiny --device cpu  # a one-minute smoke run with a tiny CLIP (checks it runs)

Plain = float32, attention through the plain softmax(QK^T)V kernel, crops resized by PIL. Fast =
what train.py and eval.py use on that device: on a GPU bf16 autocast, the fused attention kernels
and crops resized on the GPU; on a CPU float32 with the fused attention kernel. Both use the same
random weights and images. FLOPs are counted by torch.utils.flop_counter for one step; a path's
floor is FLOPs / (the matmul rate of the precision it runs in, measured in the same timed rounds as
the row), and "x floor" says how far a row is from it. Before the tables, a check that the fast path
changes no result: feature cosines and top-1 agreement of fast vs plain, and the text cut and length
buckets against full-length sequences in float32. Then the text encoder alone (class prompts, no
gradient): all 77 positions, the batch cut after its longest prompt, and length buckets; there the
floor is each prompt's work at its own length. Not a test: the numbers depend on the machine.
"""

import contextlib
import copy
import itertools
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import options
import prompts
import speed
import train
from bench_data import bench_classnames, make_jpegs, smooth_images, write_split_dataset
from clip.model import CLIP
from clip.tokenizer import tokenize
from data import Datum, TrainSet, test_loader
from measure import (HostSyncs, count_flops, fast_dtype, full_length_text_features, gpu_profile,
                     peak_memory, rated, timed, x_floor)
from prompts.common import encode_by_length, zeroshot_classifier

B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
           vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
           transformer_heads=8, transformer_layers=12)
# 12 narrow layers: every method fits
TINY = dict(B16, image_resolution=32, vision_width=64, vision_patch_size=8,
            embed_dim=64, transformer_width=64, transformer_heads=1)


def path_context(fast, device):
    """The fast path: train.py's precision (autocast unless float32) + fused attention. The plain
    path: float32 + the math kernel."""
    if not fast:
        return sdpa_kernel(SDPBackend.MATH)
    if fast_dtype(device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=fast_dtype(device))


def side_by_side(fn, device, repeat, show, flops=None):
    """fn(fast) on the plain and the fast path, timed in turn: [show(seconds), peak memory, x floor]
    of plain, then of fast. The floor is fn's FLOPs (counted on each path, or `flops` for both) at
    the matmul rate of that path's precision, measured in the same rounds."""
    fns = [lambda fast=fast: fn(fast) for fast in (False, True)]
    peaks = peak_memory(fns, device)
    seconds, rates = rated(fns, device, repeat)
    cells = []
    for fast, s, peak in zip((False, True), seconds, peaks):
        count = flops if flops is not None else count_flops(lambda: fn(fast))
        cells += [show(s), peak, x_floor(s, count, rates[fast])]
    return cells


@torch.no_grad()
def agreement_rows(clip_model, device, n_images=5000, n_classes=1000, batch=250):
    """Fast vs plain on the same weights and images: min cosine of image and text features, top-1
    agreement of the logits; and the text cut and the length buckets vs full-length sequences in
    float32 (max relative difference)."""
    names = bench_classnames(n_classes)
    text_features = {}
    for fast in (False, True):
        with path_context(fast, device):
            # [n_cls, D], normalised
            text_features[fast] = zeroshot_classifier(clip_model, names, "a photo of a {}.")
    image_features = {False: [], True: []}
    n_px = clip_model.visual.input_resolution
    # each batch of images made once, seen by both paths
    for k, start in enumerate(range(0, n_images, batch)):
        size = min(batch, n_images - start)  # the last batch may be smaller: every image counts
        images = smooth_images(size, n_px, torch.Generator().manual_seed(k)).to(device)
        for fast in (False, True):
            with path_context(fast, device):
                image_features[fast].append(F.normalize(clip_model.encode_image(images).float(),
                                                        dim=-1))
    (img_p, txt_p), (img_f,
                     txt_f) = ((torch.cat(image_features[fast]),
                                text_features[fast]) for fast in (False, True))
    cos_p, cos_f = img_p @ txt_p.t(), img_f @ txt_f.t()  # [n_images, n_cls]
    top1 = (cos_p.argmax(-1) == cos_f.argmax(-1)).float().mean().item()
    top2 = cos_p.topk(2, dim=-1).values  # random weights give near-ties; the gap says how near
    yield from [(f"fast vs plain, {len(img_p)} images: image features, min cosine",
             f"{(img_p * img_f).sum(-1).min():.5f}"),
            (f"fast vs plain, {len(txt_p)} prompts: text features, min cosine",
             f"{(txt_p * txt_f).sum(-1).min():.5f}"),
            ("fast vs plain: top-1 agreement of the logits", f"{100 * top1:.2f}%"),
            ("plain: median gap between top-1 and top-2 cosine (random weights: near-ties)",
             f"{(top2[:, 0] - top2[:, 1]).median():.1e}")]
    text = tokenize([f"a photo of a {name}." for name in names]).to(device)  # [n_cls, 77]
    # the plain kernel, then whatever fused kernel float32 gets
    for kernel in (SDPBackend.MATH, None):
        with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
            full = torch.cat([full_length_text_features(clip_model,
                                                        chunk) for chunk in text.split(batch)])
            cut = torch.cat([clip_model.encode_text(chunk) for chunk in text.split(batch)])
            buckets = encode_by_length(clip_model, text, chunk=batch)
        cut_at = int(text.argmax(-1).max()) + 1
        for name, features in ((f"text cut at {cut_at}", cut), ("length buckets", buckets)):
            rel = ((features - full).norm(dim=-1) / full.norm(dim=-1)).max().item()
            yield (f"{name} vs all 77 positions, {len(text)} prompts, float32, "
                   f"{'math' if kernel else 'default'} attention kernel: max "
                   f"relative difference, bit-identical",
                   f"{rel:.1e}, {torch.equal(features, full)}")


@torch.no_grad()
def text_rows(clip_model, device, prompt_counts=(100, 1000), repeat=10):
    """Class prompts through the text encoder, in the fast path: prompts/s and x floor of all 77
    positions (with the one extra row that keeps them), the batch cut after its longest prompt,
    and length buckets. The floor is the work of each prompt alone at its own length, at the
    fast path's matmul rate."""
    for n in prompt_counts:
        # [n, 77]
        text = tokenize([f"a photo of a {name}." for name in bench_classnames(n)]).to(device)
        lengths, counts = text.argmax(-1).unique(return_counts=True)
        with path_context(True, device):
            flops = sum(
                count_flops(lambda: clip_model.encode_text(text[text.argmax(-1) == eot][:1]))
                * int(k)
                for eot, k in zip(lengths, counts)
            )  # each prompt alone, at its own length
            mean = (lengths + 1).float().mul(counts).sum() / n
            row = [f"text forward, {n} class prompts ({mean:.1f} tokens on average, "
                   f"longest {int(lengths.max()) + 1})"]
            encoders = (full_length_text_features, CLIP.encode_text, encode_by_length)
            fns = [lambda e=e: e(clip_model, text) for e in encoders]
            peaks = peak_memory(fns, device)
            seconds, rates = rated(fns, device, repeat)
            for s, peak in zip(seconds, peaks):
                row += [f"{n / s:,.0f} prompts/s", peak, x_floor(s, flops, rates[True])]
        yield row


def augment_rows(device, n_px, images=16, batch=4, repeat=3):
    """Time to get one augmented training batch from decoded images: PIL vs on the device (the fast
    path resizes on the device where train.py does: on a GPU). Where the fast path crops with PIL
    too (a CPU), it is the plain path's code, timed once and shown in both columns."""
    folder = tempfile.mkdtemp(prefix="bench_train_jpegs_")
    items = [Datum(p, 0, "x") for p in make_jpegs(folder, images)]
    n_batches = -(-images // batch)  # one pass over the images, the last batch possibly smaller
    row = [f"train batch of {batch}: crop + resize + flip, {n_batches} batches from {images} "
           f"decoded 500x375 images"]
    on_device = speed.switch_on(options.DEFAULTS, "augment_on_device", device.startswith("cuda"))
    fetches = []
    for crop_device in [None, device] if on_device else [None]:
        trainset = TrainSet(items, n_px, seed=0, device=crop_device)
        loader = torch.utils.data.DataLoader(trainset, batch_size=batch, shuffle=True)
        assert len(loader) == n_batches
        fetches.append(lambda loader=loader: [x.to(device) for x, _ in loader])
    results = timed(fetches, device, repeat, warmup=1)
    if len(results) == 1:  # the fast path is the plain one
        results *= 2
    for seconds in results:
        row += [f"{seconds / n_batches * 1e3:.2f} ms", "", ""]
    yield row


def train_step_rows(clip_model, methods, class_counts, device, repeat=10, batch=None):
    """One SGD step of each method through train.py's own step (train.train_step), in the
    method's last stage (where everything it defines learns), at its own batch size (CoOp 32,
    MaPLe 4, ...) unless `batch` is given. Plain: float32 weights, the math attention kernel,
    eager. Fast: what train.py runs on this device: on a GPU bf16 with the frozen matrices cast
    once (speed.keep_in_precision) and the step replayed as a CUDA graph; on a CPU float32 and
    eager. Then the fast step's host syncs (counted on its eager form: a replay dispatches
    nothing), and on a GPU the share of the step the GPU is busy and the kernel launches per
    step (torch.profiler)."""
    fast_clip = fast_copy(clip_model, config(methods[0], device))
    n_px = clip_model.visual.input_resolution
    for method in methods:
        plain, fast, eager = (config(method, device, **flags) for flags in (
            dict(precision="fp32", cuda_graphs="off"), {}, dict(cuda_graphs="off")))
        b = batch or plain["batch_size"]
        images = torch.randn(b, 3, n_px, n_px,
                             generator=torch.Generator().manual_seed(0)).to(device)
        for n_cls in class_counts:
            labels = torch.randint(0, n_cls, (b,),
                                   generator=torch.Generator().manual_seed(n_cls)).to(device)
            steps = {False: make_step(clip_model, n_cls, plain),
                     True: make_step(fast_clip, n_cls, fast)}

            def step(fast):
                with contextlib.nullcontext() if fast else sdpa_kernel(SDPBackend.MATH):
                    return steps[fast](images, labels)
            # The FLOPs of a step after the first: a first step also makes what the method keeps
            # (PromptSRC: frozen CLIP's features of 60 templates x the classes, 25 steps' worth).
            step(False)
            flops = count_flops(lambda: step(False))
            row = [f"train step {method}, {n_cls} classes, batch {b}",
                   *side_by_side(step, device, repeat, lambda seconds: f"{seconds * 1e3:.1f} ms",
                                 flops=flops)]
            eager_step = make_step(fast_clip, n_cls, eager)
            eager_step(images, labels)  # what a method makes on its first step is not a step's cost
            with HostSyncs() as syncs:
                eager_step(images, labels)
            fast_seconds = timed([lambda: step(True)], device, repeat)[0]
            yield row + [str(syncs.count), *gpu_profile(lambda: step(True), device, fast_seconds)]


def config(method, device, **flags):
    """The settings train.py would run `method` with on this device, given these flags
    (options.config), on a data set of CoOp's defaults: a row times train.py's own settings."""
    return options.config(method, "caltech101", device=device, **flags)


def fast_copy(clip_model, cfg):
    """The frozen CLIP as train.py keeps it for these settings: on a GPU in bf16, its matrices
    cast once."""
    return speed.keep_in_precision(copy.deepcopy(clip_model),
                                   cfg) if cfg["device"].startswith("cuda") else clip_model


def make_step(clip_model, n_cls, cfg):
    """train.train_step for cfg's method on n_cls classes, in its last stage, with cfg's precision
    and CUDA graphs (the plain path: fp32, off)."""
    model = train.build_method(cfg["method"], clip_model, bench_classnames(n_cls),
                               "a photo of a {}.", cfg)
    model.set_stage(model.stages(cfg)[-1][0])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return train.train_step(model, optimizer, cfg)


def eval_rows(clip_model, method, device, batch=256, jpegs=2000, workers=8, repeat=10):
    """Evaluation of `method` (the first of --methods) at 50 classes: from tensors, and from JPEG
    files. Fast: the frozen CLIP as train.py keeps it on this device (fast_copy)."""
    n_px = clip_model.visual.input_resolution
    images = torch.randn(batch, 3, n_px, n_px, device=device)
    cfg = config(method, device)
    models = {fast: train.build_method(method, c, bench_classnames(50), "a photo of a {}.",
                                       cfg).eval()
              for fast, c in ((False, clip_model), (True, fast_copy(clip_model, cfg)))}
    text_features = {}
    for fast in (False, True):
        with torch.no_grad(), path_context(fast, device):
            text_features[fast] = models[fast].text_features()

    def logits(fast):
        with torch.no_grad(), path_context(fast, device):
            return models[fast].logits(images, text_features[fast])
    yield [f"eval {method} from tensors, batch {batch}",
           *side_by_side(logits, device, repeat, lambda seconds: f"{batch / seconds:,.0f} img/s")]
    folder = tempfile.mkdtemp(prefix="bench_jpegs_")
    items = [Datum(p, 0, "x") for p in make_jpegs(folder, jpegs)]
    row = [f"eval {method} from {jpegs} JPEGs 500x375, batch {batch}, {workers} workers"]

    def run(fast):
        with torch.no_grad(), path_context(fast, device):
            features = models[fast].text_features()
            for x, _ in test_loader(items, n_px, batch, workers):
                models[fast].logits(x.to(device, non_blocking=True), features)
    runs = [lambda fast=fast: run(fast) for fast in (False, True)]
    for peak, seconds in zip(peak_memory(runs, device), timed(runs, device, repeat=1, warmup=1)):
        row += [f"{jpegs / seconds:,.0f} img/s", peak, ""]
    yield row


def whole_run_rows(config, methods, sizes, device, workers):
    """Wall time of one base2novel run per method through train.py (its defaults, test base and
    novel): on the toy world (its tiny CLIP), or on synthetic JPEG data sets of a real one's size
    with random weights of `config`."""
    workdir = tempfile.mkdtemp(prefix="bench_runs_")
    weights = os.path.join(workdir, "clip.pt")
    torch.save(CLIP(**config).state_dict(), weights)
    for name, n_classes, per_class in sizes:
        folder = os.path.join(workdir, name)
        if name == "toy":
            dataset = ["--dataset", "toy", "--root", os.path.join(workdir, "data")]
            what = "the toy world (its tiny CLIP)"
        else:
            t0 = time.time()
            write_split_dataset(folder, n_classes, per_class)
            print(f"{name}: wrote {n_classes} x {sum(per_class)} JPEGs in {time.time() - t0:.0f} s",
                  flush=True)
            dataset = ["--dataset", f"folder:{folder}", "--model", weights, "--workers",
                       str(workers)]
            what = f"{name}: {n_classes} classes, {per_class} per class"
        for method in methods:
            t0 = time.time()
            metrics = train.main(["--method", method, *dataset, "--device", device,
                                  "--out", os.path.join(workdir, f"run_{name}_{method}")])
            yield [f"base2novel run {method}, {what}", "", "", "", f"{time.time() - t0:.1f} s wall",
                   "", f"hm {metrics['hm']:.1f}"]


# Caltech101: 100 classes, 16 shots + 4 val, ~25 test images each (2,465 in all). ImageNet:
# 1,000 classes, 16 + 4, and 10 test images each instead of 50, to keep the disk and the lease
# small (say so when reporting).
RUN_SIZES = {"toy": ("toy", 24, None), "caltech101": ("caltech101", 100, (16, 4, 25)),
             "imagenet": ("imagenet", 1000, (16, 4, 10))}
# Each preset's values of the options left unset: the full table, a one-minute smoke run with a tiny
# CLIP, and --quick, which a 10-minute GPU lease runs whole (the steps people compare, a toy run, a
# Caltech101-size PMPO run).
PRESETS = dict(
    full=dict(classes=[50, 500], text_prompts=[100, 1000], jpegs=2000, eval_batch=256, images=2000,
              agreement_classes=1000, repeat=10, runs=[]),
    tiny=dict(classes=[50], text_prompts=[100], jpegs=50, eval_batch=32, images=250,
              agreement_classes=100, repeat=1, runs=[]),
    quick=dict(methods=["coop", "maple", "pmpo"], run_methods=["pmpo"], classes=[50],
               text_prompts=[100], jpegs=500, eval_batch=256, images=500, agreement_classes=200,
               repeat=5, runs=["toy", "caltech101"]),
)
TRAIN_HEADER = ["", "plain: time or rate", "plain: peak mem", "plain: x floor",
                "fast: time or rate", "fast: peak mem", "fast: x floor", "fast: host syncs/step",
                "fast: GPU busy", "fast: launches/step"]


def main(argv=None):
    p = options.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda if there is one)")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--tiny", action="store_true",
                        help="a tiny CLIP, small counts: checks that the script runs")
    preset.add_argument("--quick", action="store_true",
                        help="coop, maple, pmpo at 50 classes, a toy run and a "
                        "Caltech101-size PMPO run: under 8 minutes on one GPU")
    p.add_argument("--methods", nargs="+", choices=list(prompts.METHODS),
                   help="of the train steps (default: all)")
    p.add_argument("--run_methods", nargs="+", choices=list(prompts.METHODS),
                   help="of the whole runs (default: --methods)")
    p.add_argument("--batch", type=int,
                   help="of the train steps (default: each method's own batch_size)")
    p.add_argument("--classes", nargs="+", type=int,
                   help="of the train steps (default 50 500: Caltech101 base, "
                   "ImageNet base; --tiny, --quick: 50)")
    p.add_argument("--text_prompts", nargs="+", type=int,
                   help="of the text rows (default 100 1000)")
    p.add_argument("--jpegs", type=int, help="JPEGs of the eval row (default 2000)")
    p.add_argument("--eval_batch", type=int, help="batch of the eval rows (default 256)")
    p.add_argument("--images", type=int, help="images of the fast-vs-plain check (default 2000)")
    p.add_argument("--agreement_classes", type=int, help="prompts of that check (default 1000)")
    p.add_argument("--repeat", type=int, help="timed runs per row, median shown (default 10)")
    p.add_argument("--workers", type=int, default=options.DEFAULTS["workers"],
                   help="loader workers of the JPEG rows and whole runs (default: train.py's)")
    p.add_argument("--runs", nargs="*", choices=list(RUN_SIZES),
                   help="also time whole base2novel runs: the toy world, or "
                        "synthetic data sets of these sizes")
    args = p.parse_args(argv)
    check_device(p, args.device)
    values = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    for key, value in {**values, "methods": values.get("methods", list(prompts.METHODS))}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.run_methods = args.run_methods or args.methods
    for key in ("jpegs", "eval_batch", "images", "agreement_classes", "repeat", "workers",
                "classes", "text_prompts", "batch"):
        values = getattr(args, key)
        if values is not None and min(values if isinstance(values, list) else [values]) < (
            key != "workers"
        ):
            p.error(f"--{key} must be at least {int(key != 'workers')} (got {values})")
    if not (args.tiny or args.device.startswith("cuda")):  # a long wait: say so before it starts
        print(f"note: ViT-B/16-sized weights on the CPU, 0.2 to 1 s an image forward: the first "
              f"check ({args.images} images, both paths) prints after {args.images // 150} to "
              f"{args.images // 30} minutes, the whole table after hours (--quick is sized for a "
              f"GPU). `--tiny` checks the script in about a minute; docs/performance.md has a "
              f"shorter CPU command at ViT-B/16 sizes.\n", flush=True)
    # its ops are far too small for threads to pay off; with other jobs on the
    # CPU they wait on each other
    if args.tiny:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    config = TINY if args.tiny else B16
    clip_model = CLIP(**config).to(args.device).requires_grad_(False).eval()
    # the header's rates, measured alone (each row measures its own)
    rates = rated([], args.device, args.repeat)[1]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}; torch {torch.__version__}; measured matmul rate: float32 (plain) "
          f"{rates[False] / 1e12:.3f} TFLOP/s, "
          f"{str(fast_dtype(args.device)).replace('torch.', '')} (fast) {rates[True] / 1e12:.3f} "
          f"TFLOP/s; {'tiny CLIP' if args.tiny else 'ViT-B/16-sized random weights'}\n")
    # Every row is printed the moment it is measured: a run cut short keeps what it had.
    checks = print_rows(["check", "result"],
                        agreement_rows(clip_model, args.device, args.images,
                                       args.agreement_classes))
    rows = print_rows(TRAIN_HEADER, itertools.chain(
        augment_rows(args.device, clip_model.visual.input_resolution, repeat=args.repeat),
        train_step_rows(clip_model, args.methods, args.classes, args.device, args.repeat,
                        args.batch),
        eval_rows(clip_model, args.methods[0], args.device, args.eval_batch, args.jpegs,
                  args.workers, args.repeat),
        whole_run_rows(config, args.run_methods, [RUN_SIZES[r] for r in args.runs], args.device,
                       args.workers)))
    text = print_rows(["fast path, no gradient", "all 77 positions", "peak mem", "x floor",
                       "batch cut", "peak mem", "x floor", "length buckets", "peak mem", "x floor"],
                      text_rows(clip_model, args.device, args.text_prompts, args.repeat))
    return dict(checks=checks, rows=rows, text=text)


def check_device(parser, device):
    """A device this machine has, before anything runs."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        parser.error(f"--device {device!r} cannot be used here ({str(e).splitlines()[0]}); "
                     f"use cpu{', or cuda' if torch.cuda.is_available() else ''}")


def print_rows(header, rows):
    """Prints a markdown table's header, then each row of the iterable as it
    comes; returns the rows."""
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|", flush=True)
    done = []
    for row in rows:
        row = list(row) + [""] * (len(header) - len(row))
        print("| " + " | ".join(row) + " |", flush=True)
        done.append(row)
    return done


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
