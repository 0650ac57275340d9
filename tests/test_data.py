"""Datasets, seeded splits and the shared preprocessing spec."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgecli.config import PipelineConfig
from edgecli.data import load_splits, split_indices
from edgecli.data.preprocess import PreprocessSpec, load_image_file
from edgecli.errors import DataError


def _cfg(**data) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "t", "data": data})


def test_digits_are_8bit_pixels_and_splits_are_stratified_and_seeded():
    s1 = load_splits(_cfg(dataset="digits"))
    s2 = load_splits(_cfg(dataset="digits"))
    assert s1.kind == "image" and s1.train.raw.dtype == np.uint8 and s1.train.raw.shape[1:] == (8, 8, 1)
    assert s1.train.raw.max() == 255
    assert np.array_equal(s1.test.y, s2.test.y) and np.array_equal(s1.test.raw, s2.test.raw)
    assert len(s1.train) + len(s1.val) + len(s1.test) == 1797
    counts = np.bincount(s1.test.y)
    assert counts.min() >= 34 and counts.max() <= 38  # every class in the test split
    # per-dataset normalisation measured on train only
    assert abs(float(s1.train.x.mean())) < 0.05 and abs(float(s1.train.x.std()) - 1) < 0.05


def test_split_indices_disjoint():
    y = np.repeat(np.arange(5), 40)
    tr, va, te = split_indices(y, 0.2, 0.2, seed=3)
    assert len(set(tr) | set(va) | set(te)) == 200 and not (set(tr) & set(te))


def test_png_of_a_digit_preprocesses_exactly_like_training(tmp_path):
    s = load_splits(_cfg(dataset="digits", preprocess={"resize": [32, 32], "channels": 3}))
    raw = s.test.raw[0]
    Image.fromarray(raw[:, :, 0], "L").save(tmp_path / "d.png")
    spec = PreprocessSpec.from_dict(s.spec.to_dict())  # as read back from card.json
    x = spec.apply(load_image_file(str(tmp_path / "d.png"), 1)[None])
    assert x.shape == (1, 3, 32, 32)
    assert np.array_equal(x[0], s.test.x[0])


def test_imagefolder_csv_npz_and_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    s = load_splits(_cfg(dataset="imagefolder", path=str(root)))
    assert s.class_names == ["cat", "dog"] and s.spec.input_shape == [3, 12, 10]

    csv = tmp_path / "t.csv"
    rows = ["a,b,label"] + [f"{i},{i * 2},{'yes' if i % 2 else 'no'}" for i in range(30)]
    csv.write_text("\n".join(rows) + "\n")
    s = load_splits(_cfg(dataset="csv", path=str(csv)))
    assert s.kind == "table" and s.class_names == ["no", "yes"] and s.spec.input_shape == [2]

    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 5)).astype(np.float32), y=np.arange(40) % 4)
    s = load_splits(_cfg(dataset="npz", path=str(tmp_path / "d.npz")))
    assert s.num_classes == 4 and s.train.x.shape[1] == 5

    s = load_splits(_cfg(dataset="synthetic", shape=[3, 16, 16], num_classes=3, num_samples=60))
    assert s.spec.input_shape == [3, 16, 16] and s.num_classes == 3


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("empty", "no class sub-folders"),
    ("nan", "NaN or Inf"),
    ("label", "not in data.class_names"),
    ("zero", "zero samples: c"),
])
def test_bad_data_is_a_one_line_data_error(tmp_path, case, match):
    if case == "missing":
        data = {"dataset": "imagefolder", "path": str(tmp_path / "nope")}
    elif case == "empty":
        (tmp_path / "e").mkdir()
        data = {"dataset": "imagefolder", "path": str(tmp_path / "e")}
    else:
        p = tmp_path / "t.csv"
        body = "\n".join(f"{i},{'a' if i % 2 else 'b'}" for i in range(20))
        if case == "nan":
            body += "\nnan,a"
        if case == "label":
            body += "\n3,z"
        p.write_text("x,label\n" + body + "\n")
        data = {"dataset": "csv", "path": str(p)}
        if case in ("label", "zero"):
            data["class_names"] = ["a", "b"] + (["c"] if case == "zero" else [])
    with pytest.raises(DataError, match=match):
        load_splits(_cfg(**data))
