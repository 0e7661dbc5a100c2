"""Data for CLIP prompt learning, as CoOp/CoCoOp/MaPLe read it: same splits, same
few-shot draws, same transforms.

    ds = build_dataset("eurosat", root)  # ds.train/val/test: [Datum], ds.classnames, ds.template
    train, val = fewshot_split(ds.train, ds.val, 16, seed=1)  # CoOp's K-shot draw
    (train, val, test), classnames = subsample_classes("base", train, val, ds.test)
    loader = DataLoader(TrainSet(train, 224, seed=1), batch_size=4, shuffle=True)
    for images, labels in test_loader(test, 224): ...
"""

from data.datasets import (DATASETS, Dataset, DatasetNotFound, Datum, build_dataset,
                           duplicate_classnames, prompt_name)
from data.fewshot import (classes_left_out, fewshot_split, load_fewshot, save_fewshot,
                          subsample_classes)
from data.loaders import TestSet, TrainSet, load_image, test_loader
from data.transforms import test_transform, train_transform

__all__ = [
    "DATASETS", "Dataset", "DatasetNotFound", "Datum", "build_dataset", "duplicate_classnames",
    "prompt_name", "classes_left_out", "fewshot_split", "subsample_classes", "save_fewshot",
    "load_fewshot",
    "TrainSet", "TestSet", "test_loader", "load_image", "train_transform", "test_transform",
]  # fmt: skip
