"""Few-shot sampling and the base/novel class split, exactly as CoOp/Dassl
do them, and fewshot.json.

CoOp seeds Python's `random` with the run's seed (train.py -> set_random_seed) right before it
builds the data set, then calls Dassl's generate_fewshot_dataset twice: K shots per class from
train, then min(K, 4) from val, continuing the same random stream. Nothing else draws from `random`
in between when the split file exists, so a fresh random.Random(seed) replays the same draws: the
sample is a pure function of (split file, K, seed), here and in CoOp.
"""
import json
import math
import os
import random

from clip.files import atomic_write
from data.datasets import classnames_of, prompt_name, read_rows


def sample_per_class(items, shots, rng):
    """Dassl's generate_fewshot_dataset(items, num_shots=shots) with repeat=False (its default).

    Classes are visited in order of first appearance in `items` (Dassl groups them in a
    defaultdict, whose order is insertion order); a class with fewer than `shots` items keeps all
    of them, in their order. Older Dassl versions defaulted to repeat=True, which instead draws
    such a class with replacement (random.choices) and so also shifts the draws of every later
    class; CoOp passes no `repeat`, so shots cached by CoOp under an old Dassl can differ from
    these for data sets with small classes.
    """
    by_label = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    out = []
    for group in by_label.values():
        out += rng.sample(group, shots) if len(group) >= shots else group
    return out


def fewshot_split(train, val, shots, seed):
    """K-shot train and min(K, 4)-shot val, the pair CoOp caches as
    split_fewshot/shot_{K}-seed_{seed}.pkl.

    shots < 1 keeps everything. Note that CoOp's ImageNet samples train only and keeps the full val
    (= test); the train list here is the same, because train is drawn first.
    """
    if shots < 1:
        return list(train), list(val)
    rng = random.Random(seed)  # the same stream as random.seed(seed) + random.sample(...)
    train = sample_per_class(train, shots, rng)
    val = sample_per_class(val, min(shots, 4), rng)
    return train, val


def subsample_classes(subsample, *lists):
    """CoOp's base/novel split: sort the labels of the FIRST list, base = first
    ceil(n/2), new = the rest.

    Returns the lists filtered to those classes and relabelled 0..m-1, and their class names in
    label order. In CoOp the first list is the few-shot train set. If it is empty (test-only data)
    the first non-empty list is used instead. subsample="all" returns the lists unchanged.
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', not {subsample!r}")
    if subsample == "all":
        return tuple(list(items) for items in lists), classnames_of(*lists)
    source = next((items for items in lists if items), [])
    labels = sorted({item.label for item in source})
    m = math.ceil(len(labels) / 2)  # an odd count gives base the extra class
    keep = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(keep)}
    out = tuple(
        [item._replace(label=relabel[item.label]) for item in items if item.label in relabel]
        for items in lists
    )
    return out, classnames_of(*out)


def classes_left_out(train, *lists):
    """Names of the classes with images in `lists` but none in `train`. CoOp's base/novel split
    (subsample_classes) is cut from train's labels only, so under base2novel such a class is
    neither base nor novel: it is never evaluated. Kept as CoOp does; train.py warns."""
    trained = {item.label for item in train}
    return sorted({item.classname for items in lists for item in items
                   if item.label not in trained})


# -----------------------------------------------------------------------------
# fewshot.json: the sampled lists, paths relative to the data set's image
# folder, so they can be shared


def save_fewshot(path, train, val, image_dir):
    def rows(items):
        out = []
        for item in items:
            rel = os.path.relpath(item.impath, image_dir)
            if rel.startswith(".."):
                raise ValueError(f"{item.impath} is not inside the image folder {image_dir}")
            out.append(json.dumps([rel.replace(os.sep, "/"), item.label, item.classname]))
        return "[\n" + ",\n".join(out) + "\n]"

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:  # one item per line, in sampling order: readable and diffable
        f.write('{"train": ' + rows(train) + ',\n"val": ' + rows(val) + "}\n")


def load_fewshot(path, image_dir, classnames=None):
    """fewshot.json -> (train, val), every row checked (data.datasets.read_rows); with the data
    set's `classnames`, each label must be one of them under the same name."""
    fix = "Delete it to draw the shots anew from --seed, or restore it."
    train, val = read_rows(path, image_dir, ("train", "val"), "fewshot.json", fix,
                           contiguous=False)  # a class may have no training image
    for item in train + val if classnames is not None else []:
        if item.label >= len(classnames):
            raise ValueError(f"{path}: label {item.label} ({item.classname!r}) is not a class of "
                             f"the data set, which has {len(classnames)}. {fix}")
        now = classnames[item.label]
        if now != prompt_name(item.classname):
            raise ValueError(f"{path} gives label {item.label} the name {item.classname!r}, but "
                             f"the data set has {now!r} there ({len(classnames)} classes): it "
                             f"was drawn from another data set or version. {fix}")
    return train, val
