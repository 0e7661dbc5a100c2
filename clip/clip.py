"""OpenAI's weights: `available_models()` and `load(name) -> (model,
preprocess)`, as in openai/CLIP.

The names code ported from openai/CLIP uses (CoOp's `load_clip_to_cpu`: `from clip import clip`,
`clip._MODELS[name]`, `clip._download(url)`, `clip.build_model`, `clip.tokenize`, `clip._transform`)
are here with OpenAI's meaning.

What is safe to load: a plain state_dict is read with torch.load(weights_only=True), which only
rebuilds tensors and containers. OpenAI ships TorchScript archives, read with torch.jit.load, which
deserialises TorchScript code: load archives only from OpenAI's URLs below (the download is checked
against the sha256 in _MODELS) or from sources you trust.
"""
import errno
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile

import torch

from .files import file_digest
from .model import build_model
from .tokenizer import tokenize
from .transform import Preprocess

__all__ = ["available_models", "load", "tokenize"]


class _ModelURLs(dict):
    """A dict whose missing names say which ones exist (CoOp's default RN50 is a ResNet CLIP)."""

    def __missing__(self, name):
        raise KeyError(f"Model {name} not found; available models = {list(self)} (the "
                       f"ResNet CLIPs are not supported)")


# name -> URL, as in openai/CLIP. The second-to-last part of each URL is the file's sha256.
# The ResNet CLIPs are left out (model.py is ViT only).
_CDN = "https://openaipublic.azureedge.net/clip/models/"
_MODELS = _ModelURLs({name: f"{_CDN}{sha256}/{file}" for name, (sha256, file) in {
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                       "ViT-L-14-336px.pt"),
}.items()})
# OpenAI's CDN host has moved before: a URL on one of these hosts is tried on the others after it.
MIRRORS = ["https://openaipublic.azureedge.net/clip/models/",
           "https://openaipublic.blob.core.windows.net/clip/models/"]
RETRIES = 3  # attempts per mirror on connection errors; each one resumes where the last one stopped
RETRY_DELAY = 2.0  # seconds, times the attempt number
TIMEOUT = 30  # seconds without data before a connection counts as dead


def available_models():
    return list(_MODELS)


def cache_root(download_root=None):
    """Where named models are cached: download_root if given, else
    $CLIP_CACHE, else ~/.cache/clip."""
    return os.path.expanduser(
        download_root or os.environ.get("CLIP_CACHE") or os.path.join("~", ".cache", "clip")
    )


def _transform(n_px):
    """openai/CLIP's name for the preprocessing load returns: PIL image -> normalised
    tensor [3, n_px, n_px]."""
    return Preprocess(n_px)


def load(name, device="cuda" if torch.cuda.is_available() else "cpu", jit=False,
         download_root=None):
    """Return (model, preprocess): a float32 CLIP in eval mode on `device`, and
    its PIL -> tensor transform.

    openai/CLIP's signature. name: one of available_models() (downloaded once into
    cache_root(download_root)), "toy" (clip/toy.py's tiny CLIP, read from the
    repository's sha256-pinned clip/toy_clip.npz), or the path of a checkpoint (OpenAI's
    TorchScript .pt or a plain state_dict). jit: only for openai/CLIP's call signature;
    there is no TorchScript model here.
    """
    if jit:
        raise ValueError("jit=True is not supported: load returns a plain nn.Module "
                         "(use torch.compile for speed)")
    if name in _MODELS:
        path = _download(_MODELS[name], cache_root(download_root))
    elif name == "toy":  # the toy world's tiny CLIP (clip/toy.py), shipped in the repository
        path = _toy().shipped()
    elif os.path.isfile(name):
        path = name
    else:
        raise RuntimeError(f"Model {name} not found; available models = "
                           f"{available_models()} and 'toy' "
                           "(the ResNet CLIPs are not supported; the path of "
                           "a checkpoint file works too)")
    state_dict = _read_state_dict(path)
    try:
        model = build_model(state_dict)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # OpenAI's load casts the model to fp16 on CUDA. We keep float32 weights (so fine-tuning and
    # prompt learning get float32 gradients) and leave speed to torch.autocast at call time.
    return model.to(device).eval(), _transform(model.visual.input_resolution)


def sha256(name, download_root=None):
    """The sha256 of the file load(name) reads, recorded by a run so that no result of another CLIP
    is reused: a named model's is in its URL (checked on download), the toy CLIP's is pinned, a
    path's is computed."""
    if name in _MODELS:
        return _MODELS[name].split("/")[-2]
    if name == "toy":
        return _toy().SHIPPED_SHA256
    if os.path.isfile(name):
        return file_digest(name)
    return load(name)  # raises load's message for an unknown name


def _read_state_dict(path):
    """A checkpoint file -> its state_dict, with a clear RuntimeError if the file cannot be read."""
    try:
        if _is_torchscript(path):
            # "torch.jit.load is deprecated": no other reader exists for these
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                state_dict = torch.jit.load(path, map_location="cpu").state_dict()
        elif path.endswith(".npz"):  # the toy CLIP's file (clip/toy.py save)
            state_dict = _toy().read(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # torch reports a damaged file as RuntimeError, UnpicklingError, EOFError, ...
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise RuntimeError(f"{path} could not be read: it looks truncated or damaged ({reason}). "
                           "Delete it and download again (or save it again).") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        # a training checkpoint {"state_dict": ..., "optimizer": ...}
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        found = (
            f"a dict with keys {list(state_dict)[:5]}"
            if isinstance(state_dict, dict)
            else type(state_dict).__name__
        )
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), found {found}")
    # a sparse, meta (data-less) or complex tensor would fail deep in load_state_dict, or lose its
    # imaginary part; float16 and other real dtypes load as float32 (build_model)
    for key, t in state_dict.items():
        layout = str(t.layout).removeprefix("torch.")  # "strided": dense
        kind = "meta" if t.is_meta else "complex" if t.is_complex() else layout
        if kind != "strided":
            raise ValueError(f"{path}: {key} is a {kind} tensor; a CLIP's weights are dense "
                             f"tensors of real numbers (save model.state_dict() as it is)")
    if _toy().PACKED[0] in state_dict:  # the toy CLIP's file: rows no caption moved are regenerated
        try:
            return _toy().unpack(state_dict)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    # saved from DataParallel/DDP
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _toy():
    """clip/toy.py, imported when first needed rather than at the top: `python -m clip.toy` loads
    the package, and so this module, before it runs toy.py as __main__, and a toy.py imported here
    would run twice (runpy warns). Not a cycle: toy.py imports nothing from this module."""
    from . import toy
    return toy


def _is_torchscript(path):
    """torch.jit.save writes a zip with code/ and constants.pkl; torch.save's zip has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _download(url, root=None):
    """openai/CLIP's _download: the file at `url` in root (default cache_root()), fetched
    unless a file with the sha256 the URL carries is already there; returns its path. Tried on
    every mirror of its host."""
    root = root or cache_root()
    expected, filename = url.split("/")[-2:]
    target = os.path.join(root, filename)
    if os.path.isfile(target):
        if file_digest(target) == expected:
            return target
        print(f"{target} does not match its sha256 (damaged or replaced); downloading it again",
              file=sys.stderr)
        os.remove(target)
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "cannot be written (read-only?)")
        return download(_mirrors(url), target, expected)
    except OSError as e:  # only this machine's own errors get here (_fetch_with_retries)
        raise RuntimeError(f"the CLIP cache {root} (CLIP_CACHE; default ~/.cache/clip) cannot "
                           f"hold {filename}: {e.strerror or e}. Set CLIP_CACHE to a folder "
                           f"with room (ViT-B/16: about 350 MB) that this user can write, or "
                           f"pass --model PATH of a local copy.") from None
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nWithout a network: put {filename} (sha256 "
                           f"{expected}) into {root}, or pass the "
                           "path of a local copy instead of the model name (clip.load(PATH); "
                           "train.py and eval.py: --model PATH).") from None


def _mirrors(url):
    """url, then the same file on each other host in MIRRORS (if url is on one of them)."""
    for host in MIRRORS:
        if url.startswith(host):
            return [url] + [other + url[len(host):] for other in MIRRORS if other != host]
    return [url]


def download(urls, target, sha256=None, name=None, md5=None):
    """Fetch the first of `urls` that answers into target: resumable, with
    retries and a progress line.

    Also used by data/prepare.py. With sha256 and/or md5 given, the file takes its final name only
    if its digests match; without either, nothing about its content is checked.
    """
    urls, name = [urls] if isinstance(urls, str) else urls, name or os.path.basename(target)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    part, errors = target + ".part", []
    for url in urls:
        if not _fetch_with_retries(url, part, errors):
            continue
        for algorithm, expected in (("sha256", sha256), ("md5", md5)):
            if expected and (actual := file_digest(part, algorithm)) != expected:
                os.remove(part)
                raise RuntimeError(f"{algorithm} mismatch: the download of {name} from {url} is "
                                   f"corrupt: {algorithm} {actual}, expected "
                                   f"{expected}; it was deleted, try again")
        os.replace(part, target)  # atomic: no reader ever sees a half-written target
        return target
    raise RuntimeError(f"could not download {name}:\n  " + "\n  ".join(errors))


def _fetch_with_retries(url, part, errors):
    """Try to fetch url into part a few times; record failures in `errors`;
    return True on success."""
    for attempt in range(1, RETRIES + 1):
        try:
            _fetch(url, part)
            return True
        # the server answered (404, 403, ...): retrying will not help
        except urllib.error.HTTPError as e:
            errors.append(f"{url}: {e}")
            return False
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
            if isinstance(e, OSError) and local_error(e):  # a full disk: retrying will not help
                raise
            errors.append(f"{url} (attempt {attempt}): {e}")
            if attempt < RETRIES:
                time.sleep(RETRY_DELAY * attempt)
    return False


def local_error(e):
    """Whether an OSError is this machine's (writing the file) rather than the network's."""
    return not isinstance(e, urllib.error.URLError) and e.errno in (
        errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
        errno.EISDIR)


def _fetch(url, part):
    """Download url into part, resuming after the bytes part already holds (HTTP Range)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # 416: part is not a prefix of this file (e.g. already too long); start over
        os.remove(part)
        return _fetch(url, part)
    with response, open(part, "ab" if response.status == 206 else "wb") as f:  # 200: Range ignored
        have = have if response.status == 206 else 0
        size = int(response.headers.get("Content-Length", -1))
        got, start = 0, time.time()
        while block := response.read(1 << 20):
            f.write(block)
            got += len(block)
            _progress(url, have + got, have + size if size >= 0 else None,
                      got / max(time.time() - start, 1e-3))
        print(file=sys.stderr)
    if 0 <= size != got:  # http.client returns EOF, not an error, when the server closes early
        raise ConnectionError(f"connection closed after {got} of {size} bytes")


def _progress(url, done, total, speed):
    percent = f"{100 * done / total:5.1f}% " if total else ""
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    print(f"\r{url.rsplit('/', 1)[-1]}: {percent}{size} {speed / 1e6:.1f} MB/s", end="",
          file=sys.stderr)
