"""`--dataset toy`: the toy world's downstream data set, written once into
the data root as PNG files.

The images are the *dark* rendering of clip/toy.py's 24 classes, the one its template "a photo of a
{}." does not describe (read clip/toy.py first). They go to <root>/toy/<class>/<split>_<i>.png with
a split.json in CoOp's format, the layout of a `folder:` data set, so the run reads them through the
same reader, few-shot draw, loaders and transforms as a real data set.

    python -m data.toy --picture toy_world.png  # a grid of samples per class, base and novel marked
"""

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from clip import toy
from clip.files import atomic_write, load_json

# Images per class and split; 16 shots are drawn from the 32. [ours] 100 test images a class: one
# image is 0.08 points of a half's accuracy, well under the seeds' spread.
PER_CLASS = dict(train=32, val=8, test=100)
SEED = 1  # of the downstream images (pre-training draws its own from clip/toy.py's seed)


def ensure_world(path):
    """Write the data set into `path` unless the same world is already there; returns path."""
    stamp = os.path.join(path, "world.json")
    if os.path.isfile(stamp):
        redraw = f"delete the folder {path} and it is drawn again"
        if read_world(stamp, redraw) != stamp_of_world():
            raise ValueError(f"{stamp} records a toy world drawn with other settings (clip/toy.py "
                             f"or data/toy.py was changed, or the file was edited); {redraw}")
        if not os.path.isfile(os.path.join(path, "split.json")):
            raise ValueError(f"{path} is a damaged toy world: its split.json is missing; {redraw}")
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} exists but is not a toy world (no world.json); move it "
                         f"away or pass another --root")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # drawn aside, renamed into place when complete
    tmp = tempfile.mkdtemp(dir=parent, prefix=".toy.")
    try:
        write_world(tmp)
        os.rename(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and os.path.isfile(stamp):
            return ensure_world(path)  # another process (a torchrun rank) drew it: check it
        raise
    return path


def write_world(path):
    """One folder per class (sorted names = labels, as the folder reader assigns them),
    split.json, world.json."""
    rng = np.random.default_rng(SEED)
    names = sorted(toy.CLASSNAMES)
    split = {key: [] for key in PER_CLASS}
    for label, name in enumerate(names):
        os.makedirs(os.path.join(path, name))
        for key, count in PER_CLASS.items():
            for i in range(count):
                rel = f"{name}/{key}_{i:03d}.png"
                pixels = toy.draw(toy.CLASSNAMES.index(name), toy.DARK, rng)
                with atomic_write(os.path.join(path, rel), "wb") as f:
                    Image.fromarray(pixels).save(f, format="PNG")
                split[key].append([rel, label, name])
    with atomic_write(os.path.join(path, "split.json")) as f:
        json.dump(split, f)
    with atomic_write(os.path.join(path, "world.json")) as f:
        json.dump(stamp_of_world(), f)


def read_world(path, fix):
    """world.json: the stamp of the world in its folder, or a ValueError naming the file."""
    stamp = load_json(path, "toy world stamp", fix)
    if not isinstance(stamp, dict):
        raise ValueError(f"{path} is not a valid toy world stamp: it must be a JSON object, not "
                         f"a {type(stamp).__name__}; {fix}")
    return stamp


def stamp_of_world():
    """world.json: what the drawn images depend on."""
    return dict(fingerprint=toy.fingerprint(), seed=SEED, per_class=PER_CLASS)


def picture(out, per_row=8, scale=2):
    """A PNG grid: per class, its name, `per_row` downstream (dark) images, and one bright
    pre-training image for comparison; base classes on the left half, novel on the right."""
    rng = np.random.default_rng(SEED)
    names = sorted(toy.CLASSNAMES)
    cell, label_w = toy.IMAGE_SIZE * scale + 4, 120
    half = len(names) // 2
    col_w = label_w + cell * (per_row + 2)
    canvas = Image.new("RGB", (2 * col_w, 24 + cell * half), "white")
    pen = ImageDraw.Draw(canvas)
    for column, title in enumerate(("BASE classes (trained on)",
                                    "NOVEL classes (never trained on)")):
        pen.text((column * col_w + 4, 4), f"{title}: dark images | bright", fill="black")
    for label, name in enumerate(names):
        column, row = divmod(label, half)
        x, y = column * col_w, 24 + row * cell
        pen.text((x + 4, y + cell // 3), name, fill="black")
        index = toy.CLASSNAMES.index(name)
        images = [toy.draw(index, toy.DARK, rng) for _ in range(per_row)] + [toy.draw(index,
                                                                                      toy.BRIGHT,
                                                                                      rng)]
        for i, pixels in enumerate(images):
            tile = Image.fromarray(pixels).resize((toy.IMAGE_SIZE * scale,) * 2, Image.NEAREST)
            canvas.paste(tile, (x + label_w + cell * (i + (i == per_row)), y))
    with atomic_write(out, "wb") as f:
        canvas.save(f, format="PNG")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Look at the toy world before training on it.")
    p.add_argument("--picture", default="toy_world.png",
                   help="PNG file to write (default: toy_world.png)")
    print("wrote", picture(p.parse_args().picture))
