"""Speed and memory of training and evaluation, plain path vs fast path, against the FLOP floor.

    python bench.py                      # on a GPU: ViT-B/16-sized random weights, the full table
    python bench.py --tiny --device cpu  # a smoke run with a tiny CLIP (checks the script, not the speed)

Plain = float32, attention through the plain softmax(QK^T)V kernel. Fast = bf16 autocast and the
fused attention kernels (what train.py and eval.py use on a GPU). Both use the same random weights
and images. FLOPs are counted by torch.utils.flop_counter for one step; the floor is
FLOPs / (the card's measured bf16 matmul rate), and "x floor" says how far a row is from it.
Not a test: the numbers depend on the machine.
"""
import argparse
import contextlib
import statistics
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from clip.model import CLIP
from data import Datum, test_loader
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
    """Median seconds of fn() over `repeat` runs after `warmup`, and the peak GPU memory in GiB."""
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
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


def train_step_rows(clip_model, methods, class_counts, device, rate):
    rows = []
    images = torch.randn(4, 3, clip_model.visual.input_resolution, clip_model.visual.input_resolution, device=device)
    labels = torch.randint(0, 2, (4,), device=device)
    for method in methods:
        for n_cls in class_counts:
            cfg = {**train.DEFAULTS, **train.METHODS[method].DEFAULTS}
            model = train.build_method(method, clip_model, [f"class {i}" for i in range(n_cls)], "a photo of a {}.", cfg)
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
                row += [f"{seconds * 1e3:.1f} ms", f"{peak:.2f} GiB", f"{seconds / (flops / rate):.1f}x"]
            rows.append(row)
    return rows


def eval_rows(clip_model, device, rate, batch=256, jpegs=2000, workers=8):
    n_px = clip_model.visual.input_resolution
    images = torch.randn(batch, 3, n_px, n_px, device=device)
    model = train.build_method("coop", clip_model, [f"class {i}" for i in range(50)], "",
                               {**train.DEFAULTS, **train.METHODS["coop"].DEFAULTS})
    model.eval()
    row = [f"eval from tensors, batch {batch}"]
    for fast in (False, True):
        with torch.no_grad(), path_context(fast, device):
            text_features = model.text_features()
            seconds, peak = timed(lambda: model.logits(images, text_features), device)
            flops = count_flops(lambda: model.logits(images, text_features))
        row += [f"{batch / seconds:,.0f} img/s", f"{peak:.2f} GiB", f"{seconds / (flops / rate):.1f}x"]
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
        row += [f"{jpegs / seconds:,.0f} img/s", f"{peak:.2f} GiB", ""]
    rows.append(row)
    return rows


def write_split_dataset(folder, n_classes, per_class, size=(500, 375)):
    """A folder data set with split.json: per_class = (train, val, test) JPEGs of each class."""
    import json
    import os
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
    import os
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
    p.add_argument("--methods", nargs="+", default=list(train.METHODS))
    p.add_argument("--classes", nargs="+", type=int, default=[50, 500], help="Caltech101 base, ImageNet base")
    p.add_argument("--jpegs", type=int, default=2000)
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
    rows = train_step_rows(clip_model, args.methods, args.classes, args.device, rate)
    rows += eval_rows(clip_model, args.device, rate, jpegs=args.jpegs, workers=args.workers)
    # Caltech101: 100 classes, 16 shots + 4 val, ~25 test images each (2,465 in all). ImageNet: 1,000 classes,
    # 16 + 4, and 10 test images each instead of 50, to keep the disk and the lease small (say so when reporting).
    sizes = {"caltech101": ("caltech101", 100, (16, 4, 25)), "imagenet": ("imagenet", 1000, (16, 4, 10))}
    rows += whole_run_rows(config, args.methods, [sizes[r] for r in args.runs], args.device, args.workers)
    header = ["", "plain: time or rate", "plain: peak mem", "plain: x floor",
              "fast: time or rate", "fast: peak mem", "fast: x floor"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
