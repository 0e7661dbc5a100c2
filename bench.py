"""Speed and memory of training and evaluation, plain path vs fast path, against the FLOP floor.

    python bench.py                      # on a GPU: ViT-B/16-sized random weights, the full table
    python bench.py --tiny --device cpu  # a smoke run with a tiny CLIP (checks the script, not the speed)

Plain = float32, attention through the plain softmax(QK^T)V kernel, crops resized by PIL. Fast = bf16
autocast, the fused attention kernels and crops resized on the device (what train.py and eval.py use
on a GPU). Both use the same random weights and images. FLOPs are counted by torch.utils.flop_counter
for one step; the floor is FLOPs / (the card's measured bf16 matmul rate), and "x floor" says how far
a row is from it. Before the table, a check that the fast path changes no result: feature cosines
and top-1 agreement of fast vs plain, and the text cut against full-length sequences in float32.
Not a test: the numbers depend on the machine.
"""
import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import prompts
import train
from clip.model import CLIP
from clip.tokenizer import tokenize
from data import Datum, TrainSet, test_loader
from prompts.common import zeroshot_classifier
from data.bench_loader import make_jpegs

B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
           context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
TINY = dict(B16, image_resolution=32, vision_width=64, vision_patch_size=8,  # 12 narrow layers: every method fits
            embed_dim=64, transformer_width=64, transformer_heads=1)


def path_context(fast, device):
    """The fast path: bf16 autocast + fused attention. The plain path: float32 + the math kernel."""
    if fast:
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return sdpa_kernel(SDPBackend.MATH)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, warmup=3, repeat=10):
    """Median seconds of fn() over `repeat` runs after `warmup`, and the peak GPU memory ("n/a" off a GPU)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else "n/a"
    return statistics.median(times), peak


def matmul_rate(device, n=8192):
    """Measured bf16 matrix-multiply rate of the device in FLOP/s (the floor's denominator)."""
    n = n if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds, _ = timed(lambda: a @ b, device)
    return 2 * n ** 3 / seconds


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_classnames(n):
    """n real class names of the benchmark: Caltech101's for 50 (its base classes), SUN397's then Food101's for
    500 (ImageNet's are not in the repo; these are as long). The text cut makes prompt length matter."""
    with open(os.path.join(os.path.dirname(__file__), "tests", "fixtures", "benchmark_classnames.json")) as f:
        names = json.load(f)
    pool = names["Caltech101"][:50] if n <= 50 else names["SUN397"] + names["Food101"] + names["StanfordCars"]
    return (pool * (n // len(pool) + 1))[:n]


def smooth_images(n, n_px, generator):
    """n synthetic images [n, 3, n_px, n_px]: random 7x7 colour fields upsampled, plus a little noise."""
    fields = torch.randn(n, 3, 7, 7, generator=generator)
    images = F.interpolate(fields, size=(n_px, n_px), mode="bicubic", align_corners=False)
    return images + 0.1 * torch.randn(images.shape, generator=generator)


def full_length_text_features(model, text, embeddings=None, deep_prompts=None):
    """encode_text over all 77 positions, nothing cut: the reference of the cut and of the length buckets.

    Same arguments as encode_text (text may be shorter than 77; embeddings then as long as text). One
    extra row whose end-of-text token sits at the last position makes encode_text keep all 77; the
    rows of a batch never see each other, so it changes no other row.
    """
    B, L = text.shape
    n = model.context_length
    last = torch.zeros(1, n, dtype=text.dtype, device=text.device)
    last[0, -1] = model.token_embedding.num_embeddings - 1  # the highest id: its end-of-text
    text = torch.cat([F.pad(text, (0, n - L)), last])  # [B + 1, 77]
    if embeddings is not None:
        embeddings = F.pad(embeddings, (0, 0, 0, n - L, 0, 1))  # [B + 1, 77, width], zeros behind
    deep_prompts = {layer: F.pad(t, (0, 0, 0, 0, 0, 1)) if t.dim() == 3 else t  # [B + 1, n, width]
                    for layer, t in (deep_prompts or {}).items()}
    return model.encode_text(text, embeddings=embeddings, deep_prompts=deep_prompts)[:B]  # [B, embed_dim]


@torch.no_grad()
def agreement_rows(clip_model, device, n_images=5000, n_classes=1000, batch=250):
    """Fast vs plain on the same weights and images: min cosine of image and text features, top-1
    agreement of the logits; and the text cut vs full-length sequences in float32 (max relative difference)."""
    names = bench_classnames(n_classes)
    text_features = {}
    for fast in (False, True):
        with path_context(fast, device):
            text_features[fast] = zeroshot_classifier(clip_model, names, "a photo of a {}.")  # [n_cls, D], normalised
    image_features = {False: [], True: []}
    for k in range(n_images // batch):  # each batch of images made once, seen by both paths
        images = smooth_images(batch, clip_model.visual.input_resolution, torch.Generator().manual_seed(k)).to(device)
        for fast in (False, True):
            with path_context(fast, device):
                image_features[fast].append(F.normalize(clip_model.encode_image(images).float(), dim=-1))
    (img_p, txt_p), (img_f, txt_f) = ((torch.cat(image_features[fast]), text_features[fast]) for fast in (False, True))
    cos_p, cos_f = img_p @ txt_p.t(), img_f @ txt_f.t()  # [n_images, n_cls]
    top1 = (cos_p.argmax(-1) == cos_f.argmax(-1)).float().mean().item()
    top2 = cos_p.topk(2, dim=-1).values  # random weights give near-ties; the gap says how near
    rows = [(f"fast vs plain, {n_images} images: image features, min cosine", f"{(img_p * img_f).sum(-1).min():.5f}"),
            (f"fast vs plain, {n_classes} prompts: text features, min cosine", f"{(txt_p * txt_f).sum(-1).min():.5f}"),
            ("fast vs plain: top-1 agreement of the logits", f"{100 * top1:.2f}%"),
            ("plain: median gap between top-1 and top-2 cosine (random weights: near-ties)",
             f"{(top2[:, 0] - top2[:, 1]).median():.1e}")]
    text = tokenize([f"a photo of a {name}." for name in names]).to(device)  # [n_cls, 77]
    for kernel in (SDPBackend.MATH, None):  # the plain kernel, then whatever fused kernel float32 gets
        with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
            cut = torch.cat([clip_model.encode_text(chunk) for chunk in text.split(batch)])
            full = torch.cat([full_length_text_features(clip_model, chunk) for chunk in text.split(batch)])
        rel = ((cut - full).norm(dim=-1) / full.norm(dim=-1)).max().item()
        rows.append((f"text cut at {int(text.argmax(-1).max()) + 1} of 77 positions vs all 77, float32, "
                     f"{'math' if kernel else 'default'} attention kernel: max relative difference, bit-identical",
                     f"{rel:.1e}, {torch.equal(cut, full)}"))
    return rows


def augment_rows(device, n_px, images=16, batch=4, steps=50):
    """Time to get one augmented training batch from decoded images: PIL on the CPU vs on the device."""
    folder = tempfile.mkdtemp(prefix="bench_train_jpegs_")
    items = [Datum(p, 0, "x") for p in make_jpegs(folder, images)]
    row = [f"train batch of {batch}: crop + resize + flip, {images} decoded 500x375 images"]
    for on_device in (False, True):
        trainset = TrainSet(items, n_px, seed=0, device=device if on_device else None)
        loader = torch.utils.data.DataLoader(trainset, batch_size=batch, shuffle=True)

        def fetch():
            for _, (x, _) in zip(range(steps), loader):
                x.to(device)
        seconds, _ = timed(fetch, device, warmup=1, repeat=3)
        row += [f"{seconds / steps * 1e3:.2f} ms", "", ""]
    return [row]


def train_step_rows(clip_model, methods, class_counts, device, rate):
    rows = []
    images = torch.randn(4, 3, clip_model.visual.input_resolution, clip_model.visual.input_resolution, device=device)
    labels = torch.randint(0, 2, (4,), device=device)
    for method in methods:
        for n_cls in class_counts:
            cfg = {**train.DEFAULTS, **prompts.METHODS[method].DEFAULTS}
            model = train.build_method(method, clip_model, bench_classnames(n_cls), "a photo of a {}.", cfg)
            if method == "aple":
                model.set_stage("joint")
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
            row = [f"train step {method}, {n_cls} classes, batch 4"]
            for fast in (False, True):
                def step():
                    with path_context(fast, device):
                        loss = model.loss(images, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                seconds, peak = timed(step, device)
                flops = count_flops(step)
                row += [f"{seconds * 1e3:.1f} ms", peak, f"{seconds / (flops / rate):.1f}x"]
            rows.append(row)
    return rows


def eval_rows(clip_model, device, rate, batch=256, jpegs=2000, workers=8):
    n_px = clip_model.visual.input_resolution
    images = torch.randn(batch, 3, n_px, n_px, device=device)
    model = train.build_method("coop", clip_model, bench_classnames(50), "",
                               {**train.DEFAULTS, **prompts.METHODS["coop"].DEFAULTS})
    model.eval()
    row = [f"eval from tensors, batch {batch}"]
    for fast in (False, True):
        with torch.no_grad(), path_context(fast, device):
            text_features = model.text_features()
            seconds, peak = timed(lambda: model.logits(images, text_features), device)
            flops = count_flops(lambda: model.logits(images, text_features))
        row += [f"{batch / seconds:,.0f} img/s", peak, f"{seconds / (flops / rate):.1f}x"]
    rows = [row]
    folder = tempfile.mkdtemp(prefix="bench_jpegs_")
    items = [Datum(p, 0, "x") for p in make_jpegs(folder, jpegs)]
    row = [f"eval from {jpegs} JPEGs 500x375, batch {batch}, {workers} workers"]
    for fast in (False, True):
        def run():
            with torch.no_grad(), path_context(fast, device):
                text_features = model.text_features()
                for x, _ in test_loader(items, n_px, batch, workers):
                    model.logits(x.to(device, non_blocking=True), text_features)
        seconds, peak = timed(run, device, warmup=1, repeat=1)
        row += [f"{jpegs / seconds:,.0f} img/s", peak, ""]
    rows.append(row)
    return rows


def write_split_dataset(folder, n_classes, per_class, size=(500, 375)):
    """A folder data set with split.json: per_class = (train, val, test) JPEGs of each class."""
    rows = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        paths = make_jpegs(os.path.join(folder, f"class_{c}"), sum(per_class), size)
        start = 0
        for split, n in zip(rows, per_class):
            rows[split] += [[os.path.relpath(p, folder), c, f"class {c}"] for p in paths[start:start + n]]
            start += n
    with open(os.path.join(folder, "split.json"), "w") as f:
        json.dump(rows, f)


def whole_run_rows(config, methods, sizes, device, workers):
    """Wall time of one base2novel run per method (train at the paper defaults, test base and novel)."""
    workdir = tempfile.mkdtemp(prefix="bench_runs_")
    weights = os.path.join(workdir, "clip.pt")
    torch.save(CLIP(**config).state_dict(), weights)
    rows = []
    for name, n_classes, per_class in sizes:
        folder = os.path.join(workdir, name)
        t0 = time.time()
        write_split_dataset(folder, n_classes, per_class)
        print(f"{name}: wrote {n_classes} x {sum(per_class)} JPEGs in {time.time() - t0:.0f} s")
        for method in methods:
            t0 = time.time()
            metrics = train.main(["--method", method, "--dataset", f"folder:{folder}", "--model", weights,
                                  "--device", device, "--workers", str(workers),
                                  "--out", os.path.join(workdir, f"run_{name}_{method}")])
            rows.append([f"base2novel run {method}, {name}: {n_classes} classes, {per_class} per class",
                         "", "", "", f"{time.time() - t0:.1f} s wall", "", f"hm {metrics['hm']:.1f}"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny CLIP: checks that the script runs")
    p.add_argument("--methods", nargs="+", default=list(prompts.METHODS))
    p.add_argument("--classes", nargs="+", type=int, default=[50, 500], help="Caltech101 base, ImageNet base")
    p.add_argument("--jpegs", type=int, default=2000)
    p.add_argument("--images", type=int, default=5000, help="synthetic images of the fast-vs-plain check")
    p.add_argument("--agreement_classes", type=int, default=1000, help="prompts of the fast-vs-plain check")
    p.add_argument("--workers", type=int, default=train.DEFAULTS["workers"])
    p.add_argument("--runs", nargs="*", default=[], choices=["caltech101", "imagenet"],
                   help="also time whole base2novel runs on synthetic data sets of these sizes")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = TINY if args.tiny else B16
    clip_model = CLIP(**config).to(args.device).requires_grad_(False).eval()
    rate = matmul_rate(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}; measured bf16 matmul rate {rate / 1e12:.3f} TFLOP/s; "
          f"{'tiny CLIP' if args.tiny else 'ViT-B/16-sized random weights'}\n")
    print("| check | result |\n|---|---|")
    for check, result in agreement_rows(clip_model, args.device, args.images, args.agreement_classes):
        print(f"| {check} | {result} |", flush=True)
    rows = augment_rows(args.device, clip_model.visual.input_resolution)
    rows += train_step_rows(clip_model, args.methods, args.classes, args.device, rate)
    rows += eval_rows(clip_model, args.device, rate, jpegs=args.jpegs, workers=args.workers)
    # Caltech101: 100 classes, 16 shots + 4 val, ~25 test images each (2,465 in all). ImageNet: 1,000 classes,
    # 16 + 4, and 10 test images each instead of 50, to keep the disk and the lease small (say so when reporting).
    sizes = {"caltech101": ("caltech101", 100, (16, 4, 25)), "imagenet": ("imagenet", 1000, (16, 4, 10))}
    rows += whole_run_rows(config, args.methods, [sizes[r] for r in args.runs], args.device, args.workers)
    header = ["", "plain: time or rate", "plain: peak mem", "plain: x floor",
              "fast: time or rate", "fast: peak mem", "fast: x floor"]
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
