"""Dataset loaders. Each returns a RawDataset holding data as a user would hold it."""

from __future__ import annotations

import csv

import numpy as np

from edgecli.data.base import RawDataset, check_labels, class_order, need_file, need_path
from edgecli.data.images import (
    IMAGE_SUFFIXES,
    image_is_colour,
    list_imagefolder,
    load_image_file,
    resize_images,
)
from edgecli.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "RawDataset", "load_csv", "load_digits", "load_imagefolder", "load_npz", "load_synthetic"]
# kept for callers of the names this module had before data/base.py
_check_labels, _need_path, _need_file = check_labels, need_path, need_file


def load_digits(cfg) -> RawDataset:
    """scikit-learn's 8x8 handwritten digits (1797 real scans, values 0-16) as 8-bit grayscale pixels."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # what a PNG would hold
    return RawDataset(pixels, d.target.astype(np.int64), [str(i) for i in range(10)], "image", "sklearn digits")


def load_imagefolder(cfg) -> RawDataset:
    """A directory with one sub-directory of images per class (nested sub-folders included)."""
    root = need_path(cfg)
    classes, files = list_imagefolder(root, cfg.class_names)
    # grayscale dataset unless any image has colour
    channels = 3 if any(image_is_colour(f) for f, _ in files[:200]) else 1
    imgs, ys, skipped = [], [], []
    for f, label in files:
        try:  # one unreadable image or decompression bomb is a per-input error, not the end of the run
            imgs.append(load_image_file(str(f), channels))
        except DataError as e:
            skipped.append({"file": f.relative_to(root).as_posix(), "error": e.message})
            continue
        ys.append(label)
    if not imgs:
        raise DataError(f"data.path: no readable image under {root} ({skipped[0]['error']})")
    sizes = {a.shape[:2] for a in imgs}
    if len(sizes) > 1:
        if not cfg.preprocess.resize:
            raise DataError(
                f"data.path: images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:3])}...); "
                "set data.preprocess.resize"
            )
        imgs = [resize_images(a[None], cfg.preprocess.resize)[0] for a in imgs]
    x = np.stack(imgs)
    y = np.asarray(ys, np.int64)
    check_labels(y, classes, str(root))
    return RawDataset(x, y, classes, "image", str(root), skipped=skipped)


def load_csv(cfg) -> RawDataset:
    """Numeric feature columns plus a label column; the feature columns' names go to the card."""
    path = need_file(cfg)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: cannot read {path} ({e})") from None
    except csv.Error as e:  # e.g. a field over the csv module's size limit
        raise DataError(f"{path}: not a valid CSV ({e})") from None
    if len(rows) < 2:
        raise DataError(f"data.path: {path} has no data rows")
    header = [h.strip() for h in rows[0]]
    if cfg.label_column not in header:
        raise DataError(f"data.label_column: '{cfg.label_column}' is not a column of {path} (columns: {', '.join(header[:8])})")
    unnamed = [i + 1 for i, h in enumerate(header) if not h or h.startswith("Unnamed: ")]
    if unnamed:  # pandas' to_csv writes its index as a nameless first column: never a feature by accident
        raise DataError(f"{path}: column {unnamed[0]} has no name (a pandas index? write the CSV with index=False); "
                        "every feature column needs a name")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{path}: column name {dup[0]!r} appears more than once")
    li = header.index(cfg.label_column)
    feats, labels = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} columns, got {len(row)}")
        try:
            vals = [float(v) for i, v in enumerate(row) if i != li]
        except ValueError:
            raise DataError(f"{path}:{n}: feature values must be numbers") from None
        if not np.isfinite(vals).all():
            raise DataError(f"{path}:{n}: NaN or Inf in features")
        if not row[li].strip():
            raise DataError(f"{path}:{n}: the label ('{cfg.label_column}') is blank")
        feats.append(vals)
        labels.append(row[li].strip())
    from edgecli.data.base import label_key

    classes, index = class_order(labels, cfg.class_names, str(path))
    y = np.asarray([index[label_key(v)] for v in labels], np.int64)
    x = np.asarray(feats, np.float32)
    check_labels(y, classes, str(path))
    return RawDataset(x, y, classes, "table", str(path), feature_names=[h for i, h in enumerate(header) if i != li])


def load_npz(cfg) -> RawDataset:
    """An .npz with arrays x (uint8 images N,H,W[,C] or float rows N,F) and y (integer labels)."""
    path = need_file(cfg)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"data.path: {path} must hold arrays 'x' and 'y' (has {', '.join(z.files)})")
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"data.path: {path}: {e} (object arrays are refused: no pickle)") from None
    except Exception as e:
        raise DataError(f"data.path: cannot read {path} as .npz ({type(e).__name__})") from None
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must hold integer labels, got {y.dtype}")
    if x.ndim == 2:
        kind = "table"
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: x contains NaN or Inf")
    elif x.ndim in (3, 4):
        if x.dtype != np.uint8:
            raise DataError(f"{path}: image arrays must be uint8 pixels (N,H,W[,C]), got {x.dtype}")
        kind = "image"
        x = x[..., None] if x.ndim == 3 else x
    else:
        raise DataError(f"{path}: x must be (N,F) rows or (N,H,W[,C]) images, got shape {list(x.shape)}")
    n_cls = cfg.num_classes or (int(y.max()) + 1 if len(y) else 0)
    if isinstance(cfg.class_names, dict):
        classes, _ = class_order([str(i) for i in range(n_cls)], cfg.class_names, str(path))
    else:
        classes = list(cfg.class_names) if cfg.class_names else [str(i) for i in range(n_cls)]
    if y.min() < 0 or y.max() >= len(classes):
        raise DataError(f"{path}: labels must lie in 0..{len(classes) - 1}, found {int(y.min())}..{int(y.max())}")
    y = y.astype(np.int64)
    check_labels(y, classes, str(path))
    return RawDataset(x, y, classes, kind, str(path))


def load_synthetic(cfg) -> RawDataset:
    """Seeded, learnable synthetic data of any shape: [C, H, W] images or [F] feature rows."""
    shape = cfg.shape or [1, 8, 8]
    k = cfg.num_classes or 10
    n = cfg.num_samples
    rng = np.random.default_rng(1234)
    y = np.arange(n) % k
    rng.shuffle(y)
    if len(shape) == 1:
        centers = rng.normal(0, 2.0, size=(k, shape[0]))
        x = (centers[y] + rng.normal(0, 1.0, size=(n, shape[0]))).astype(np.float32)
        kind = "table"
    elif len(shape) == 3:
        c, h, w = shape
        protos = rng.uniform(0, 255, size=(k, h, w, c))
        x = np.clip(protos[y] * 0.6 + rng.uniform(0, 102, size=(n, h, w, c)), 0, 255).astype(np.uint8)
        kind = "image"
    else:
        raise DataError(f"data.shape: give [C, H, W] or [F], got {shape}")
    return RawDataset(x, y.astype(np.int64), [str(i) for i in range(k)], kind, "synthetic")
