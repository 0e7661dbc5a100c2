"""Small synthetic worlds for the end-to-end tests: a tiny CLIP checkpoint and image sets in
the layouts data/datasets.py reads (CoOp's caltech-101 split file, ImageNet and its
variants, a plain class folder), and the reliability battery's world with the runs made on it.

Images are 32 x 32 (the tiny CLIP's resolution), one base colour per class plus per-image noise,
drawn from a seeded numpy generator, so every file is the same on every machine.
"""
import http.server
import importlib.util
import json
import os
import re
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from tests.tiny import tiny_clip


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one CPU thread: the tiny models' ops are far too small for two
    threads to pay off, and with another process busy on the machine, two threads wait on
    each other (5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_clip(path, seed=0, **overrides):
    """torch.save(tiny_clip(seed, **overrides).state_dict(), path); returns the path as a str."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(tiny_clip(seed, **overrides).state_dict(), str(path))
    return str(path)


def class_image(label, rng, size=32):
    """A [size, size, 3] uint8 image: the class's colour (a hue per label) with Gaussian noise."""
    hue = (label * 0.618034) % 1.0  # golden-ratio hues: neighbouring labels look different
    colour = 255 * np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
    pixels = colour[None, None] + rng.normal(0, 25, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg(path, size=(40, 30), color=(200, 30, 90), noise_seed=None):
    """A JPEG at path, of one colour or (noise_seed) uniform noise; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if noise_seed is None:
        img = Image.new("RGB", size, color)
    else:
        img = Image.fromarray(np.random.RandomState(noise_seed).randint(0, 256,
                                                                        (size[1], size[0], 3),
                                                                        dtype=np.uint8))
    img.save(path, quality=90)
    return path


def write_image(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def write_caltech101(root, classnames, train=4, val=2, test=3, seed=0, fewer=None):
    """<root>/caltech-101/101_ObjectCategories/<class>/*.jpg and split_zhou_Caltech101.json.

    Label i is classnames[i]; `fewer` = {classname: n} gives a class only n training images.
    """
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "caltech-101")
    image_dir = os.path.join(dataset_dir, "101_ObjectCategories")
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classnames):
        counts = {"train": (fewer or {}).get(name, train), "val": val, "test": test}
        for key, n in counts.items():
            for i in range(n):
                rel = f"{name}/{key}_{i:03d}.jpg"
                write_image(os.path.join(image_dir, rel), class_image(label, rng))
                split[key].append([rel, label, name])
    with open(os.path.join(dataset_dir, "split_zhou_Caltech101.json"), "w") as f:
        json.dump(split, f)
    return root


def wnid(i):
    return f"n{i + 1:08d}"


def write_classnames(path, names):
    """ImageNet's classnames.txt: 'nXXXXXXXX name' per line, wnid(i) for names[i]."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{wnid(i)} {name}\n" for i, name in enumerate(names))


def write_imagenet(root, names, train=4, val=3, seed=0):
    """<root>/imagenet/classnames.txt and images/{train,val}/<wnid>/*.JPEG."""
    rng = np.random.default_rng(seed)
    write_classnames(os.path.join(root, "imagenet", "classnames.txt"), names)
    for split, n in (("train", train), ("val", val)):
        for label in range(len(names)):
            for i in range(n):
                path = os.path.join(root, "imagenet", "images", split, wnid(label),
                                    f"{split}_{i:03d}.JPEG")
                write_image(path, class_image(label, rng))
    return root


def write_imagenet_a(root, labels, n=3, seed=1):
    """ImageNet-A's layout with a subset of ImageNet's classes:
    <root>/imagenet-adversarial/imagenet-a/<wnid>/. Its classnames.txt is ImageNet's
    (find_classnames falls back to <root>/imagenet/classnames.txt)."""
    rng = np.random.default_rng(seed)
    for label in labels:
        for i in range(n):
            path = os.path.join(root, "imagenet-adversarial", "imagenet-a", wnid(label),
                                f"{i:03d}.jpg")
            write_image(path, class_image(label, rng))
    return root


def write_imagenetv2(root, n_classes, n=2, seed=2):
    """ImageNetV2's layout:
    <root>/imagenetv2/imagenetv2-matched-frequency-format-val/<label>/*.jpeg."""
    rng = np.random.default_rng(seed)
    for label in range(n_classes):
        for i in range(n):
            path = os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val",
                                str(label), f"{i}.jpeg")
            write_image(path, class_image(label, rng))
    return root


def write_folder(path, classnames, per_class=4, seed=0):
    """A `folder:` data set: <path>/<class>/*.jpg, split 50/20/30 by data/datasets.py
    (at least 4 per class)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classnames):
        for i in range(per_class):
            write_image(os.path.join(path, name, f"{i:03d}.jpg"), class_image(label, rng))
    return str(path)


# -- the battery's world: Caltech101's layout with 4 classes and the tiny CLIP, train.py's flags
# for a short run on it, and a run killed the way kill -9 would

CLASSES = ["cat", "dog", "fish", "bird"]
FAST = {"coop": ["--epochs", "2"], "aple": ["--stage_epochs", "1", "1", "1", "--depth", "2"],
        "pmpo": ["--epochs", "2", "--n_prompts", "2", "--depth", "2"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("battery")
    root = write_caltech101(str(tmp / "data"), CLASSES, train=3, val=1, test=2)
    return SimpleNamespace(tmp=tmp, root=root, model=save_tiny_clip(tmp / "tiny.pt"))


def argv(world, out, method="coop", *extra, root=None):
    return ["--method", method, "--dataset", "caltech101", "--root", root or world.root, "--model",
            world.model, "--out", str(out), "--workers", "0", "--shots", "2", "--batch_size", "2",
            *FAST[method], *extra]


def message_of(call, capsys):
    """call() must stop with SystemExit; its message (or argparse's, on stderr). Any
    other exception fails."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        call()
    text = (str(e.value.code) if not isinstance(e.value.code,
                                                int) else "") + capsys.readouterr().err
    assert e.value.code != 0 and "Traceback" not in text
    return text


def load_ckpt(folder):
    return torch.load(os.path.join(folder, "prompt_learner.pt"), map_location="cpu",
                      weights_only=True)


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (BaseException, so no
    `except Exception` sees it)."""


def crash_after_epochs(mp, n):
    """Kill the run as its (n+1)-th epoch starts."""
    calls, real = [], train.lr_at

    def lr_at(*args):
        calls.append(1)
        if len(calls) > n:
            raise Killed
        return real(*args)

    mp.setattr(train, "lr_at", lr_at)


def interrupted(world, out, method="coop", epochs=1, root=None):
    with pytest.MonkeyPatch.context() as mp:
        crash_after_epochs(mp, epochs)
        with pytest.raises(Killed):
            train.main(argv(world, out, method, root=root))


# -- stand-ins for the outside world: a file server, a port nothing listens on, open_clip's files

def serve(answer):
    """(server, its URL): a local HTTP server on 127.0.0.1 whose GETs answer(handler) handles,
    quietly, in a daemon thread; tests never reach the network."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            answer(self)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_port}"


class Server:
    """An HTTP file server on 127.0.0.1 that honours Range (unless told not to) and can
    cut its first response after `cut_after` bytes. `requests` records each request's
    path and Range header."""

    def __init__(self, files, cut_after=None, honour_range=True):
        self.files, self.cut_after, self.honour_range, self.requests = (
            files,
            cut_after,
            honour_range,
            [],
        )
        self.httpd, url = serve(self.answer)
        self.url = url + "/"

    def answer(self, h):
        self.requests.append(SimpleNamespace(path=h.path, range=h.headers.get("Range")))
        data = self.files.get(h.path.lstrip("/"))
        if data is None:
            return h.send_error(404)
        start = int(re.fullmatch(r"bytes=(\d+)-",
                                 h.headers["Range"])[1]) if h.headers.get("Range") else 0
        start = start if self.honour_range else 0
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        cut = self.cut_after if self.cut_after is not None and len(self.requests) == 1 else None
        # then the connection closes (HTTP/1.0), after `cut` bytes if cut
        h.wfile.write(data[start:][:cut])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def refused_url():
    """The URL of a port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def load_open_clip_file(filename):
    """Load one file of the installed open_clip package as a standalone module."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None:
        pytest.fail("open_clip_torch is not installed: run .ci/run, which installs it "
                    "(pip install --no-deps open_clip_torch==3.3.0); it is the reference tokenizer")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    module_spec = importlib.util.spec_from_file_location("_reference_" + filename[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def snapshot(folder):
    """Every file under folder -> its bytes: what a test compares to show nothing was touched."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files
