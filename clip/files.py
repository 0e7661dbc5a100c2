"""Files that are either whole or absent: every file this project writes goes through atomic_write;
file_digest checks the bytes of one it reads (a download, the shipped toy CLIP), load_json says
which file is not the JSON it should be.

A kill, a crash or a full disk in the middle of a write leaves the previous version (or
nothing) under the final name, never a truncated file: the data goes to a temporary name in
the same folder, is flushed and fsync'ed, and only then renamed over the target (rename is
atomic within a filesystem).
"""
import contextlib
import hashlib
import json
import os
import tempfile


def current_umask():
    """The process's umask (os.umask can only be read by setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """with atomic_write("metrics.json") as f: json.dump(m, f). mode "w" (text) or "wb"
    (bytes, e.g. torch.save)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600: the mode open() would give
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    # make the rename itself durable (not possible on every platform)
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's bytes ("sha256", "md5", any hashlib name), read 1 MB at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_json(path, what, fix):
    """The parsed content of a JSON file, or a ValueError naming the file, what it
    should be and `fix` (what to do). The one reader of JSON: a file nested deeper than Python's
    recursion limit ([[[...]]]) is as damaged as a cut one."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not a valid {what}: not JSON ({err}); {fix}") from None
