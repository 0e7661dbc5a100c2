"""clip/clip.py: OpenAI-format archives and state_dicts load to the same model; downloads resume,
fall back to the next mirror and are sha256-checked; damaged files give clear errors. CPU, no
network: downloads come from a server on 127.0.0.1 that each test starts itself."""
import hashlib
import io
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import clip.clip as weights
import train
from clip import toy
from clip.model import build_model
from tests.synthetic import Server, refused_url
from tests.tiny import tiny_clip

JIT_METADATA = {"input_resolution", "context_length", "vocab_size"}


class OpenAIArchive(nn.Module):
    """Holds a CLIP's modules and parameters at the same names, plus the three int entries OpenAI's
    archives carry, so that its traced state_dict has the keys of OpenAI's ViT-B/32.pt."""

    def __init__(self, model):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.register_buffer("input_resolution", torch.tensor(model.visual.input_resolution))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.token_embedding.num_embeddings))
        self.clip = [model]  # in a list so it is not registered twice under a second name

    def forward(self, image, text):
        return self.clip[0](image, text)


def save_archive(model, path):
    image, text = inputs(model)
    # the tracer warns that encode_text's int(eot.max()) becomes a constant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(OpenAIArchive(model), (image, text), check_trace=False).save(str(path))


def inputs(model):
    """Two images and two token sequences (end-of-text = the highest id, as
    clip.tokenize makes them)."""
    g = torch.Generator().manual_seed(1)
    vocab = model.token_embedding.num_embeddings
    image = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution,
                        generator=g)
    text = torch.zeros(2, model.context_length, dtype=torch.long)
    text[0, :5], text[1, :9] = torch.randint(1, vocab - 1, (5,), generator=g), torch.randint(
        1, vocab - 1, (9,), generator=g
    )
    text[0, 5], text[1, 9] = vocab - 1, vocab - 1
    return image, text


@torch.no_grad()
def features(model):
    image, text = inputs(model)
    return model.encode_image(image), model.encode_text(text)


def assert_same_features(model, reference):
    for got, expected in zip(features(model), features(reference)):
        assert torch.equal(got, expected)


def openai_fp16(key):
    """The tensors OpenAI stores in fp16: Conv/Linear/attention weights and
    biases, and the projections."""
    return any(part in key for part in ("conv1.", "attn.", "mlp.")) or key in ("text_projection",
                                                                               "visual.proj")


# --- 1. loading files -----------------------------------------------------------------------------

def test_archive_and_state_dict_load_to_the_original_model(tmp_path):
    model = tiny_clip()
    archive, plain = tmp_path / "archive.pt", tmp_path / "plain.pt"
    save_archive(model, archive)
    torch.save(model.state_dict(), plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated
        assert (
            set(torch.jit.load(str(archive)).state_dict()) == set(model.state_dict()) | JIT_METADATA
        )
    for path in (archive, plain):
        loaded, preprocess = weights.load(str(path), device="cpu")
        assert not loaded.training and preprocess.n_px == 32
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
        # so the archive and the state_dict also agree with each other
        assert_same_features(loaded, model)


def test_training_checkpoint_with_module_prefix_loads(tmp_path):
    model = tiny_clip(seed=3)
    wrapped = {"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 7}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    assert_same_features(weights.load(str(tmp_path / "ckpt.pt"), device="cpu")[0], model)


def test_fp16_state_dict_loads_as_float32(tmp_path):
    model = tiny_clip()
    half = {k: v.half() if openai_fp16(k) else v for k, v in model.state_dict().items()}
    assert 0 < sum(v.dtype == torch.float16 for v in half.values()) < len(half)
    torch.save(half, tmp_path / "half.pt")
    loaded, _ = weights.load(str(tmp_path / "half.pt"), device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = tiny_clip()
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    assert_same_features(loaded, rounded)
    # the fp16 rounding really happened
    assert not torch.equal(features(loaded)[0], features(model)[0])


# --- 2. downloads, from a local server ------------------------------------------------------------

@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    """A tiny checkpoint registered as model "Tiny/8" (file tiny-8.pt) with its real sha256;
    serve(...) starts a Server for it and makes it the only mirror."""
    model = tiny_clip(vocab_size=512)  # ~1 MB
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(weights, "RETRY_DELAY", 0)
    servers = []

    def serve(**kwargs):
        servers.append(Server({f"{sha}/tiny-8.pt": data}, **kwargs))
        host(servers[-1].url)
        return servers[-1]

    def host(*mirrors, sha=sha):
        """Serve "Tiny/8" from the first of `mirrors`, as OpenAI's URLs do:
        HOST/SHA256/tiny-8.pt."""
        monkeypatch.setattr(weights, "MIRRORS", list(mirrors))
        monkeypatch.setitem(weights._MODELS, "Tiny/8", f"{mirrors[0]}{sha}/tiny-8.pt")

    root = tmp_path / "cache"
    yield SimpleNamespace(model=model, data=data, serve=serve, host=host, root=root,
                          file=root / "tiny-8.pt")
    for server in servers:
        server.close()


def test_download_is_verified_cached_and_loads(tiny_model, monkeypatch, capsys):
    server = tiny_model.serve()
    monkeypatch.setenv("CLIP_CACHE", str(tiny_model.root))  # no download_root: the env var decides
    loaded, _ = weights.load("Tiny/8", device="cpu")
    assert tiny_model.file.read_bytes() == tiny_model.data
    assert not (tiny_model.root / "tiny-8.pt.part").exists()
    assert_same_features(loaded, tiny_model.model)
    assert "100.0%" in capsys.readouterr().err  # the progress bar
    weights.load("Tiny/8", device="cpu")
    assert len(server.requests) == 1  # the second load used the cached file


def test_download_root_wins_over_the_environment(tiny_model, monkeypatch, tmp_path):
    tiny_model.serve()
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "env"))
    weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
    assert tiny_model.file.read_bytes() == tiny_model.data and not (tmp_path / "env").exists()


def test_cut_download_resumes_with_range(tiny_model):
    cut = len(tiny_model.data) // 3
    server = tiny_model.serve(cut_after=cut)
    loaded, _ = weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
    assert [r.range for r in server.requests] == [None, f"bytes={cut}-"]
    assert tiny_model.file.read_bytes() == tiny_model.data
    assert_same_features(loaded, tiny_model.model)


def test_server_ignoring_range_restarts_the_download(tiny_model):
    server = tiny_model.serve(cut_after=len(tiny_model.data) // 3, honour_range=False)
    weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
    assert server.requests[1].range is not None  # asked to resume, got a 200 with the whole file
    assert tiny_model.file.read_bytes() == tiny_model.data


def test_wrong_sha256_is_refused(tiny_model, monkeypatch):
    server = tiny_model.serve()
    server.files["0" * 64 + "/tiny-8.pt"] = tiny_model.data
    tiny_model.host(server.url, sha="0" * 64)
    with pytest.raises(RuntimeError) as error:
        weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
    message = str(error.value)
    assert "0" * 64 in message and hashlib.sha256(tiny_model.data).hexdigest() in message
    assert server.url + "0" * 64 + "/tiny-8.pt" in message
    assert list(tiny_model.root.iterdir()) == []  # neither the final file nor the .part


def test_dead_first_mirror_falls_back_to_the_second(tiny_model, monkeypatch):
    server = tiny_model.serve()
    tiny_model.host(refused_url(), server.url)
    weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
    assert len(server.requests) == 1 and tiny_model.file.read_bytes() == tiny_model.data


def test_all_mirrors_failing_is_a_clear_error(tiny_model, monkeypatch):
    dead, empty = refused_url(), Server({})
    try:
        tiny_model.host(dead, empty.url)
        with pytest.raises(RuntimeError, match="could not download tiny-8.pt") as error:
            weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
        message = str(error.value)
        assert dead in message and "404" in message
        assert len(empty.requests) == 1  # a 404 is an answer: no retries
        # and it says how to go on without a network: the file name, its
        # sha256, the folder, --model PATH
        sha = hashlib.sha256(tiny_model.data).hexdigest()
        assert (
            f"put tiny-8.pt (sha256 {sha}) into {tiny_model.root}" in message
            and "--model PATH" in message
        )
    finally:
        empty.close()


def test_damaged_cached_file_is_downloaded_again(tiny_model, capsys):
    server = tiny_model.serve()
    tiny_model.root.mkdir()
    tiny_model.file.write_bytes(tiny_model.data[:-10] + b"0123456789")
    weights.load("Tiny/8", device="cpu", download_root=str(tiny_model.root))
    assert len(server.requests) == 1 and tiny_model.file.read_bytes() == tiny_model.data
    assert "downloading it again" in capsys.readouterr().err


# --- 3. damaged files and other checkpoints -------------------------------------------------------

@pytest.mark.parametrize("kind", ["archive", "state_dict"])
def test_truncated_file_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "model.pt"
    save_archive(tiny_clip(), path) if kind == "archive" else torch.save(tiny_clip().state_dict(),
                                                                         path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RuntimeError,
                       match=re.escape(str(path)) + ".*truncated or damaged.*Delete it"):
        weights.load(str(path), device="cpu")


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"<html>not a checkpoint</html>" * 100)
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + ".*truncated or damaged"):
        weights.load(str(path), device="cpu")


@pytest.mark.parametrize("state_dict, reason", [
    ({"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
      "visual.attnpool.c_proj.weight": torch.zeros(8, 8),
      "token_embedding.weight": torch.zeros(10, 8)}, "ResNet CLIP"),
    ({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)},
     "not an OpenAI-layout CLIP"),
    ({k: v for k, v in tiny_clip().state_dict().items() if k != "ln_final.bias"}, "does not fit"),
    ({"model": {"weight": torch.zeros(3)}, "epoch": 3}, "expected a state_dict"),
    ([torch.zeros(3)], "expected a state_dict"),
])
def test_other_checkpoints_are_a_clear_error(tmp_path, state_dict, reason):
    path = tmp_path / "other.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + reason) as error:
        weights.load(str(path), device="cpu")
    assert "\n" not in str(error.value)  # one line, though torch's own message spans several


# --- 4. hand-made files -------------------------------------------------------------------------

def save_npz(tensors, path):
    """A file in the toy CLIP's format (clip/toy.py save: numpy arrays, no pickle)."""
    np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    return str(path)


def test_a_float16_toy_file_loads_as_float32(tmp_path):
    """OpenAI's own checkpoints are half fp16: a toy-format file whose every float is fp16 (its
    packed token-embedding rows too) loads as the float32 CLIP it rounds."""
    packed = toy.read(toy.shipped())
    half = {k: v.half() if v.is_floating_point() else v for k, v in packed.items()}
    loaded, _ = weights.load(save_npz(half, tmp_path / "half.npz"), device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = build_model(toy.unpack({k: v.float() if v.is_floating_point() else v
                                      for k, v in half.items()}))
    assert_same_features(loaded, rounded)
    assert not torch.equal(features(loaded)[1], features(build_model(toy.unpack(packed)))[1])


def packed_with(ids=None, rows=None):
    """The shipped toy CLIP's tensors, with its packed token-embedding ids and/or rows replaced."""
    packed = toy.read(toy.shipped())
    changed = zip(toy.PACKED, (ids, rows))
    return {**packed, **{key: f(packed[key]) for key, f in changed if f is not None}}


HAND_MADE = {  # name -> (what a file holds, the words of its error)
    "id past the vocabulary": (packed_with(ids=lambda i: i + 49408),
                               "token_embedding.ids must hold integer ids 0..49407"),
    "negative id": (packed_with(ids=lambda i: -1 - i), "token_embedding.ids must hold integer ids"),
    "float ids": (packed_with(ids=lambda i: i.double()), "token_embedding.ids must hold integer"),
    "a row short": (packed_with(rows=lambda r: r[:-1]), "one row of 64 numbers per id"),
    "no rows": ({k: v for k, v in packed_with().items() if k != toy.PACKED[1]},
                "one row of 64 numbers per id"),
    "sparse": ({**tiny_clip().state_dict(), "text_projection": torch.eye(64).to_sparse()},
               "text_projection is a sparse_coo tensor"),
    "meta": ({**tiny_clip().state_dict(), "ln_final.weight": torch.empty(64, device="meta")},
             "ln_final.weight is a meta tensor"),
    "complex": ({**tiny_clip().state_dict(), "logit_scale": torch.tensor(4.6 + 1j)},
                "logit_scale is a complex tensor"),
}


@pytest.mark.parametrize("case, suffix", [  # the toy format, .npz, holds only the packed ones
    (case, suffix) for case, (tensors, _) in HAND_MADE.items() for suffix in (".npz", ".pt")
    if suffix == ".pt" or toy.PACKED[0] in tensors])
def test_a_hand_made_file_is_one_error_line_naming_it(tmp_path, case, suffix):
    """Packed token-embedding ids out of range (a negative one would index from the end), rows that
    do not fit them, sparse, data-less (meta) or complex tensors: `error: FILE: ...`, not torch's
    message naming no file, nor a traceback."""
    tensors, words = HAND_MADE[case]
    path = tmp_path / f"clip{suffix}"
    save_npz(tensors, path) if suffix == ".npz" else torch.save(tensors, path)
    with pytest.raises(SystemExit) as stop:
        train.load_frozen_clip(str(path), "cpu")
    assert stop.value.code.startswith(f"error: {path}: ") and "\n" not in stop.value.code
    assert words in stop.value.code


# --- 5. names -------------------------------------------------------------------------------------

def test_available_models_are_the_four_vits():
    assert weights.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    # OpenAI's URLs: MIRRORS[0] + sha256 + "/" + file name
    for name, url in weights._MODELS.items():
        sha, filename = url.removeprefix(weights.MIRRORS[0]).split("/")
        assert (
            re.fullmatch(r"[0-9a-f]{64}", sha)
            and filename == name.replace("/", "-").replace("@", "-") + ".pt"
        )


def test_unknown_name_lists_the_models(tmp_path):
    with pytest.raises(RuntimeError) as error:  # OpenAI's error type and wording
        weights.load("ViT-H/14", device="cpu", download_root=str(tmp_path))
    message = str(error.value)
    assert message.startswith("Model ViT-H/14 not found; available models = ") and "path" in message
    assert all(name in message for name in weights.available_models())
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded
