"""What makes a training step fast on a GPU without changing what it learns beyond float rounding:
the compute precision (bf16 autocast, frozen matrices cast once) and the step replayed as a CUDA
graph. On a step of prompt learning the GPU waits on the host: a few million learned values, but
thousands of kernel launches per step (bench.py measures it).
"""
import sys
from contextlib import nullcontext

import torch

from clip.model import cast_matrices

DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def autocast(cfg):
    if cfg["precision"] == "fp32":
        return nullcontext()
    return torch.autocast(device_type=cfg["device"].split(":")[0], dtype=DTYPES[cfg["precision"]])


def keep_in_precision(clip_model, cfg):
    """On a GPU in bf16 or fp16, the frozen CLIP's matrices are cast to it once here
    (clip.model.cast_matrices: the same results as autocast casting them at every step, without
    that copy). The CPU path keeps float32 weights."""
    if cfg["device"].startswith("cuda") and cfg["precision"] in ("bf16", "fp16"):
        cast_matrices(clip_model, DTYPES[cfg["precision"]])
    return clip_model


def graphs_on(cfg):
    """--cuda_graphs: auto is on on a GPU, except under fp16 (GradScaler reads back every step)."""
    auto = cfg["device"].startswith("cuda") and cfg["precision"] != "fp16"
    return switch_on(cfg, "cuda_graphs", auto)


def switch_on(cfg, key, auto):
    """A switch's setting as a bool; `auto` is what "auto" means for this run."""
    return auto if cfg[key] == "auto" else cfg[key] == "on"


class GraphedStep:
    """A training step captured once as a CUDA graph and replayed: one launch for the thousands of
    kernels of a forward, backward and SGD step, which on a GPU otherwise cost more host time than
    the GPU spends on them (a prompt-learning step is small). PyTorch's whole-network capture:
    - the first `warmup` steps run eagerly on a side stream: CUDA's lazy set-up, the allocator's
      cache and what a method makes on first use (PromptSRC's teacher features) stay out of it;
    - the next step is captured on static input tensors (capturing computes nothing) and replayed;
      each later step copies its batch into those tensors and replays the graph;
    - SGD reads the lr as a number, so a new lr (each epoch) is captured anew; a batch of another
      shape (a last partial batch) runs eagerly.
    The outputs are the graph's own tensors, overwritten by the next replay: read or add them first.
    required=False (--cuda_graphs auto): a step that cannot be captured runs eagerly from then on,
    with a warning; required=True raises.
    """

    def __init__(self, step, optimizer, required=False, warmup=2):
        self.step, self.optimizer, self.required, self.warmup = step, optimizer, required, warmup
        self.graph = self.key = None
        self.eager = False  # set when a capture failed (auto)

    def __call__(self, images, labels):
        key = (images.shape, labels.shape, [g["lr"] for g in self.optimizer.param_groups])
        if self.eager or (self.key is not None and key[:2] != self.key[:2]):
            return self.step(images, labels)  # not capturable, or another shape than captured
        if self.warmup:
            self.warmup -= 1
            return self.side_stream(images, labels)
        if key != self.key:
            try:
                self.capture(images, labels)
            except Exception as e:  # e.g. an op that syncs: torch refuses to capture it
                if self.required:
                    raise
                print(f"warning: the step could not be captured as a CUDA graph ({e}); it runs "
                      f"eagerly (--cuda_graphs off says so up front)", file=sys.stderr)
                self.eager, self.graph = True, None
                return self.step(images, labels)
            self.key = key
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.outputs

    def side_stream(self, images, labels):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = self.step(images, labels)
        torch.cuda.current_stream().wait_stream(stream)
        return outputs

    def capture(self, images, labels):
        self.graph = self.outputs = None  # the last graph's memory goes back first
        self.images, self.labels = images.clone(), labels.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes its own .grad
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.step(self.images, self.labels)
        self.graph = graph
