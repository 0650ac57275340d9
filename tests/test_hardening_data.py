"""Hardening, family 4: data a user can get wrong, or that attacks the loader.

Two cases go through the real CLI (exit code, one line, nothing published); the many variants
call the loader in-process (the same code path, without paying torch's import per case).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecli.config import PipelineConfig
from edgecli.data import load_splits
from edgecli.errors import DataError
from tests.conftest import cli, tiny_config, write_config
from tests.test_hardening_config import assert_user_error, snapshot


def _cfg(**data) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "t", "data": data})


def _refused(tmp_path: Path, match: str, **data) -> str:
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        load_splits(_cfg(**data))
    assert "\n" not in e.value.message
    assert snapshot(tmp_path) == before
    return e.value.message


def _images(root: Path, classes=("a", "b"), n=6, size=(8, 8), mode="L") -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = size if mode == "L" else (*size, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _csv(path: Path, extra: str = "", n: int = 20) -> Path:
    body = "\n".join(f"{i},{i * 0.5},{'a' if i % 2 else 'b'}" for i in range(n))
    path.write_text("x1,x2,label\n" + body + "\n" + extra)
    return path


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("case", ["missing", "nan"])
def test_bad_data_through_the_cli_is_one_line_and_publishes_nothing(tmp_path, case):
    if case == "missing":
        data, needle = {"dataset": "imagefolder", "path": str(tmp_path / "nope")}, "does not exist"
    else:
        data, needle = {"dataset": "csv", "path": str(_csv(tmp_path / "t.csv", "inf,1,a\n"))}, "t.csv:22: NaN or Inf"
    cfg = write_config(tmp_path / "c.yaml", tiny_config("d", tmp_path / "art", data=data, model={"arch": "mlp"}))
    before = snapshot(tmp_path)
    r = cli("train", "-c", str(cfg), "--json", cwd=tmp_path)
    assert_user_error(r, 2, "data error", needle)
    assert r.stdout == ""
    changed = {k for k in before.keys() | snapshot(tmp_path).keys() if before.get(k) != snapshot(tmp_path).get(k)}
    assert changed <= {"art", "art/d", "art/d/.lock"}


# --------------------------------------------------------------------------- missing and empty


@pytest.mark.parametrize("dataset", ["imagefolder", "csv", "npz", "textcsv"])
def test_missing_path(tmp_path, dataset):
    _refused(tmp_path, "does not exist", dataset=dataset, path=str(tmp_path / "nope"))
    _refused(tmp_path, f"data.path: dataset '{dataset}' needs a", dataset=dataset)


def test_empty_folders(tmp_path):
    (tmp_path / "e").mkdir()
    _refused(tmp_path, "no class sub-folders", dataset="imagefolder", path=str(tmp_path / "e"))
    (tmp_path / "e" / "a").mkdir()
    (tmp_path / "e" / "b").mkdir()
    (tmp_path / "e" / "a" / "notes.txt").write_text("not an image")
    _refused(tmp_path, "no images", dataset="imagefolder", path=str(tmp_path / "e"))
    (tmp_path / "empty.csv").write_text("")
    _refused(tmp_path, "no data rows", dataset="csv", path=str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("x,label\n")
    _refused(tmp_path, "no data rows", dataset="csv", path=str(tmp_path / "header.csv"))


# --------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("case", ["garbage", "truncated"])
def test_an_undecodable_image_in_a_folder_is_skipped_by_name(tmp_path, case):
    """A PNG that does not decode is a per-input error (issue 12, section 6): the loader leaves it out,
    names it and why, and loads the rest; train reports it (tests/test_trust.py runs the stage)."""
    root = _images(tmp_path / "imgs")
    bad = root / "a" / "zz.png"
    if case == "garbage":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    else:
        bad.write_bytes((root / "a" / "0.png").read_bytes()[:30])
    before = snapshot(tmp_path)
    splits = load_splits(_cfg(dataset="imagefolder", path=str(root)))
    assert snapshot(tmp_path) == before
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12  # the 12 good images, not zz.png
    assert [s["file"] for s in splits.skipped] == ["a/zz.png"]
    assert "zz.png: not a readable image" in splits.skipped[0]["error"]
    assert "\n" not in splits.skipped[0]["error"]


def test_a_folder_where_no_image_decodes_is_refused(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    _refused(tmp_path, "no readable image under .*x.png: not a readable image", dataset="imagefolder", path=str(root))


@pytest.mark.parametrize("case", ["dir", "broken_link", "fifo"])
def test_unreadable_image_in_a_folder(tmp_path, case):
    root = _images(tmp_path / "imgs")
    bad = root / "a" / "zz.png"
    if case == "dir":
        bad.mkdir()
        match = "zz.png: not a regular image file"
    elif case == "broken_link":
        bad.symlink_to(tmp_path / "gone.png")
        match = "zz.png: not a regular image file"
    else:  # reading a FIFO would block the loader forever
        os.mkfifo(bad)
        match = "zz.png: not a regular image file"
    _refused(tmp_path, match, dataset="imagefolder", path=str(root))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path):
    root = _images(tmp_path / "imgs")
    (root / "a" / "0.png").chmod(0)
    _refused(tmp_path, "0.png: permission denied", dataset="imagefolder", path=str(root))
    csv = _csv(tmp_path / "t.csv")
    csv.chmod(0)
    _refused(tmp_path, "cannot read", dataset="csv", path=str(csv))


@pytest.mark.parametrize("dataset", ["csv", "npz", "textcsv"])
def test_devices_and_fifos_as_data_files_never_block(tmp_path, dataset):
    _refused(tmp_path, "is not a regular file", dataset=dataset, path="/dev/zero")
    os.mkfifo(tmp_path / "pipe")
    _refused(tmp_path, "is not a regular file", dataset=dataset, path=str(tmp_path / "pipe"))


def test_unreadable_tables(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("x,label\n1,caf\xe9\n".encode("latin-1"))
    _refused(tmp_path, "cannot read", dataset="csv", path=str(tmp_path / "latin1.csv"))
    (tmp_path / "big.csv").write_text("x,label\n" + "1" * 200_000 + ",a\n")
    _refused(tmp_path, "not a valid CSV", dataset="csv", path=str(tmp_path / "big.csv"))
    (tmp_path / "junk.npz").write_bytes(os.urandom(256))  # numpy takes unknown bytes for a pickle: refused
    _refused(tmp_path, "junk.npz: .*object arrays are refused", dataset="npz", path=str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "ok.npz", x=np.zeros((30, 4), np.float32), y=np.arange(30) % 2)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:200])
    _refused(tmp_path, "cannot read .*cut.npz as .npz", dataset="npz", path=str(tmp_path / "cut.npz"))
    np.savez(tmp_path / "wrongkeys.npz", a=np.zeros(3), b=np.zeros(3))
    _refused(tmp_path, "must hold arrays 'x' and 'y'", dataset="npz", path=str(tmp_path / "wrongkeys.npz"))
    _refused(tmp_path, r"t.csv:3: expected 3 columns, got 2", dataset="csv",
             path=str(_write(tmp_path / "t.csv", "x1,x2,label\n1,2,a\n1,b\n")))
    _refused(tmp_path, r"t.csv:2: feature values must be numbers", dataset="csv",
             path=str(_write(tmp_path / "t.csv", "x1,x2,label\none,2,a\n")))


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


class _Payload:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    canary = tmp_path / "canary"
    x = np.empty(20, dtype=object)
    x[:] = [_Payload(canary)] * 20
    np.savez(tmp_path / "evil.npz", x=x, y=np.arange(20) % 2)
    with np.load(tmp_path / "evil.npz", allow_pickle=False) as z:  # the payload really is a pickle in there
        assert z.files == ["x", "y"]
    assert b"system" in (tmp_path / "evil.npz").read_bytes()
    _refused(tmp_path, "object arrays are refused: no pickle", dataset="npz", path=str(tmp_path / "evil.npz"))
    assert not canary.exists()


# --------------------------------------------------------------------------- wrong size or mode


def test_images_of_different_sizes_need_resize(tmp_path):
    root = _images(tmp_path / "imgs")
    Image.fromarray(np.zeros((12, 9), np.uint8)).save(root / "b" / "odd.png")
    _refused(tmp_path, "images have different sizes .*set data.preprocess.resize",
             dataset="imagefolder", path=str(root))
    s = load_splits(_cfg(dataset="imagefolder", path=str(root), preprocess={"resize": [8, 8]}))
    assert s.spec.input_shape == [1, 8, 8] and len(s.train) + len(s.val) + len(s.test) == 13


def test_images_of_any_mode_become_the_datasets_mode(tmp_path):
    root = _images(tmp_path / "imgs")
    odd = {"rgba": Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "cmyk": Image.new("CMYK", (8, 8), (1, 2, 3, 4)),
           "i16": Image.fromarray(np.full((8, 8), 40000, np.uint16)), "bw": Image.new("1", (8, 8), 1),
           "palette": Image.new("P", (8, 8), 3)}
    for name, im in odd.items():
        im.save(root / "a" / f"{name}.{'jpg' if name == 'cmyk' else 'png'}")
    s = load_splits(_cfg(dataset="imagefolder", path=str(root)))
    raw = np.concatenate([s.train.raw, s.val.raw, s.test.raw])
    assert raw.dtype == np.uint8 and raw.shape[1:] == (8, 8, 3)  # colour present: every image RGB
    assert np.isfinite(s.train.x).all()


def test_image_model_given_the_wrong_raw_input(tmp_path):
    from edgecli.data.preprocess import PreprocessSpec

    s = load_splits(_cfg(dataset="digits"))
    spec = PreprocessSpec.from_dict(s.spec.to_dict())
    for bad, match in [(np.zeros((1, 8, 8, 1), np.float32), "8-bit pixels"), (np.zeros((8, 8, 1), np.uint8), "image batch"),
                       (np.zeros((1, 8, 8, 3), np.uint8), "expected 1 channel")]:
        with pytest.raises(DataError, match=match):
            spec.check_raw(bad, "x.npy")


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "NaN"])
def test_nan_or_inf_in_csv_names_the_line(tmp_path, value):
    p = _csv(tmp_path / "t.csv", f"{value},1,a\n")
    _refused(tmp_path, r"t.csv:22: NaN or Inf in features", dataset="csv", path=str(p))


def test_nan_or_inf_in_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    x[7, 2] = np.inf
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    _refused(tmp_path, "x contains NaN or Inf", dataset="npz", path=str(tmp_path / "d.npz"))
    np.savez(tmp_path / "f.npz", x=np.zeros((30, 8, 8), np.float32), y=np.arange(30) % 3)
    _refused(tmp_path, "image arrays must be uint8", dataset="npz", path=str(tmp_path / "f.npz"))
    np.savez(tmp_path / "y.npz", x=np.zeros((30, 4), np.float32), y=np.full(30, 0.5))
    _refused(tmp_path, "y must hold integer labels", dataset="npz", path=str(tmp_path / "y.npz"))


# --------------------------------------------------------------------------- labels


def test_labels_outside_the_class_list(tmp_path):
    p = _csv(tmp_path / "t.csv", "3,1,zebra\n")
    _refused(tmp_path, "label\\(s\\) zebra are not in data.class_names", dataset="csv", path=str(p), class_names=["a", "b"])
    np.savez(tmp_path / "d.npz", x=np.zeros((30, 4), np.float32), y=np.r_[np.arange(29) % 2, 7])
    _refused(tmp_path, r"labels must lie in 0..1, found 0..7", dataset="npz", path=str(tmp_path / "d.npz"),
             class_names=["a", "b"])
    np.savez(tmp_path / "n.npz", x=np.zeros((30, 4), np.float32), y=np.r_[np.arange(29) % 2, -1])
    _refused(tmp_path, r"labels must lie in 0..1, found -1..1", dataset="npz", path=str(tmp_path / "n.npz"))
    root = _images(tmp_path / "imgs", classes=("a", "b", "c"))
    _refused(tmp_path, r"folder\(s\) c are not in data.class_names", dataset="imagefolder", path=str(root),
             class_names=["a", "b"])


def test_a_class_with_zero_samples(tmp_path):
    p = _csv(tmp_path / "t.csv")
    _refused(tmp_path, "zero samples: c", dataset="csv", path=str(p), class_names=["a", "b", "c"])
    root = _images(tmp_path / "imgs")
    (root / "c").mkdir()
    _refused(tmp_path, "zero samples: c", dataset="imagefolder", path=str(root))
    np.savez(tmp_path / "d.npz", x=np.zeros((30, 4), np.float32), y=np.arange(30) % 2)
    _refused(tmp_path, "zero samples: 2", dataset="npz", path=str(tmp_path / "d.npz"), num_classes=3)
    _refused(tmp_path, "need at least 2 classes", dataset="csv",
             path=str(_write(tmp_path / "one.csv", "x,label\n" + "1,a\n" * 20)))
    _refused(tmp_path, "only 4 samples", dataset="csv", path=str(_csv(tmp_path / "few.csv", n=4)))


def test_validate_checks_calibration_data_as_compress_will(tmp_path):
    """validate said "ok" for a calibration.data that is missing or a FIFO; compress then refused it."""
    os.mkfifo(tmp_path / "calib.npy")
    for path, says in ((tmp_path / "gone.npy", "does not exist"), (tmp_path / "calib.npy", "not a regular file")):
        cfg = tiny_config("calib", tmp_path / "artifacts")
        cfg["compress"] = {"steps": [{"quantize": {"mode": "static", "calibration": {"data": str(path)}}}]}
        r = cli("validate", "-c", str(write_config(tmp_path / "calib.yaml", cfg)), cwd=tmp_path)
        assert_user_error(r, 2, "data error", "compress.steps.0.quantize.calibration.data", says)
