"""Measuring tools of bench.py, which the tests use too: the host syncs a step dispatches
(HostSyncs), its FLOPs (Flops, count_flops), time taken in turns (timed), a floor from the matmul
rate measured in the same rounds (rated, x_floor), peak GPU memory, the GPU's busy share and kernel
launches (gpu_profile), and the reference the text cut is measured against
(full_length_text_features).
"""
import collections
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import options
import speed

class HostSyncs(TorchDispatchMode):
    """Counts, while active, the ops after which the host waits for the device: on a GPU each one
    drains the launch queue, so the CPU's launch time and the GPU's work add up instead of
    overlapping. A value read back (.item(), int(t), float(t), bool(t), `if t:`) dispatches
    _local_scalar_dense; ops whose output size depends on the values (nonzero, unique,
    masked_select, boolean-mask indexing, repeat_interleave without output_size) wait for them too.
    On a CPU nothing waits, but the same ops are counted, so a CPU test finds what would stall a
    GPU. Not seen here: .tolist() and copies between devices, which do not dispatch as ops on a CPU.
    ops: Counter of op names."""

    WAIT = {"_local_scalar_dense", "nonzero", "unique_consecutive", "_unique", "_unique2",
            "unique_dim", "masked_select", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    @property
    def count(self):
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        masks = name == "index" and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        sized = (name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor")
                 and kwargs.get("output_size") is None)
        if name in self.WAIT or masks or sized:
            self.ops[name] += 1
        return func(*args, **kwargs)


class Flops(TorchDispatchMode):
    """FLOPs of the ops dispatched while active, by torch.utils.flop_counter's formulas (matmuls,
    convolutions, attention), backward included. Not its FlopCounterMode: that one also tracks
    modules, and on torch 2.11 failed on a module called under no_grad inside a step that learns
    (PMPO's projections: "Expected gradient function to be set")."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn):
    """FLOPs of one fn(), attention through the plain kernel: the formulas know no CPU fused
    attention kernel, and would leave attention out of a CPU fast path's work."""
    with sdpa_kernel(SDPBackend.MATH), Flops() as counter:
        fn()
    return counter.total


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns, device, repeat=10, warmup=None):
    """The median seconds of each fn in fns over `repeat` rounds.

    The fns take turns within each round, so a slow spell of a shared machine falls on all of them
    alike and a side-by-side ratio stays fair. warmup rounds first: 3 on a GPU (kernel choice, the
    allocator's cache), 1 on a CPU (one call warms it, and a CPU call of the full table is long).
    """
    for _ in range(min(3 if device.startswith("cuda") else 1,
                       repeat) if warmup is None else warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, seconds in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            seconds.append(time.perf_counter() - t0)
    return [statistics.median(seconds) for seconds in times]


def peak_memory(fns, device):
    """Peak GPU memory of one call of each fn alone, as text; "n/a" off a GPU."""
    if not device.startswith("cuda"):
        return ["n/a"] * len(fns)
    peaks = []
    for fn in fns:
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        peaks.append(f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return peaks


def fast_dtype(device):
    """The precision train.py runs in on this device (bf16 on a GPU, float32 on a CPU)."""
    return speed.DTYPES[options.default_precision(device)]


def matmul_probes(device, dtype):
    """[(fn, FLOPs)]: the products a floor's matmul rate is measured on, each into a preallocated
    output (the kernel alone): a square one and the two MLP products of a ViT-B/16 block over 4,096
    tokens ([4096, 768] x [768, 3072] and back). A floor at the best rate the machine shows for
    products like the model's own is one no row can beat; a rate measured on one small square
    product was beaten by the text encoder's own matmuls on a CPU (0.9x floor)."""
    n = 8192 if device.startswith("cuda") else 2048
    probes = []
    for m, k, n_out in ((n, n, n), (4096, 768, 3072), (4096, 3072, 768)):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n_out, device=device,
                                                                          dtype=dtype)
        out = torch.empty(m, n_out, device=device, dtype=dtype)
        # out=: no autocast
        probes.append((lambda a=a, b=b, out=out: torch.mm(a, b, out=out), 2 * m * k * n_out))
    return probes


def rated(fns, device, repeat):
    """timed(fns), with the matmul products of both paths' precisions taking turns in
    the same rounds: (seconds of each fn, {fast: FLOP/s}), the rate being the best
    median rate of matmul_probes.

    A floor needs the machine's rate while the row ran: on a shared CPU it drifted by a quarter
    within minutes (196 to 236 GFLOP/s), and two machines of one kind measured 111 and 257, so a
    rate measured at the start of an 8- to 17-minute table would mis-state the rows run later.
    """
    dtypes = {False: torch.float32, True: fast_dtype(device)}
    probes = [(dtype, fn,
               flops) for dtype in set(dtypes.values()) for fn, flops in matmul_probes(device,
                                                                                       dtype)]
    seconds = timed(list(fns) + [fn for _, fn, _ in probes], device, repeat)
    rate = dict.fromkeys(dtypes.values(), 0.0)
    for (dtype, _, flops), probe_seconds in zip(probes, seconds[len(fns):]):
        rate[dtype] = max(rate[dtype], flops / probe_seconds)
    return seconds[:len(fns)], {fast: rate[dtype] for fast, dtype in dtypes.items()}


def x_floor(seconds, flops, rate):
    """A row's "x floor": its time over the time of its FLOPs at the matmul
    rate (1.00x = the floor)."""
    return f"{seconds / (flops / rate):.2f}x"


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaGraphLaunch")


def gpu_profile(fn, device, step_seconds, steps=5):
    """[GPU busy %, kernel launches per step] of fn, by torch.profiler over `steps` calls: busy is
    the GPU's kernel time (overlaps merged) over the step's unprofiled time. "n/a" off a GPU."""
    if not device.startswith("cuda"):
        return ["n/a", "n/a"]
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            sync(device)
        events = prof.events()
        kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                         if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, end = 0.0, float("-inf")  # microseconds covered by at least one kernel
        for a, b in kernels:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        launches = sum(e.name in LAUNCHES for e in events)
        return [f"{100 * busy / steps / (step_seconds * 1e6):.0f} %", f"{launches / steps:,.0f}"]
    except Exception as e:  # the profiler differs between torch versions: a cell, not a crash
        return [f"profiler error: {type(e).__name__}: {e}"[:80], ""]


def full_length_text_features(model, text, embeddings=None, deep_prompts=None):
    """encode_text over all 77 positions, nothing cut: the reference of the cut
    and of the length buckets.

    Same arguments as encode_text (text may be shorter than 77; embeddings then as long as text).
    One extra row whose end-of-text token sits at the last position makes encode_text keep all 77;
    the rows of a batch never see each other, so it changes no other row.
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
    # [B, embed_dim]
    return model.encode_text(text, embeddings=embeddings, deep_prompts=deep_prompts)[:B]
