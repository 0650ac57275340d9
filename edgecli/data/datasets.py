"""Dataset loaders. Each returns a RawDataset holding data as a user would hold it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecli.data.preprocess import load_image_file, resize_images
from edgecli.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class RawDataset:
    x: np.ndarray  # image: uint8 (N, H, W, C); table: float32 (N, F); text: object (N,)
    y: np.ndarray  # int64 (N,)
    class_names: list[str]
    kind: str  # "image" | "table" | "text"
    source: str

    def __len__(self) -> int:
        return len(self.y)


def _need_path(cfg) -> Path:
    if not cfg.path:
        raise DataError(f"data.path: dataset '{cfg.dataset}' needs a path")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise DataError(f"data.path: {p} does not exist")
    return p


def _need_file(cfg) -> Path:
    p = _need_path(cfg)
    # a FIFO or a device (/dev/zero) would block or never end; only regular files are data
    if not p.is_file():
        raise DataError(f"data.path: {p} is not a regular file")
    return p


def _check_labels(y: np.ndarray, class_names: list[str], source: str) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    empty = [class_names[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{source}: class(es) with zero samples: {', '.join(empty[:5])}")
    if len(class_names) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {len(class_names)}")


def load_digits(cfg) -> RawDataset:
    """scikit-learn's 8x8 handwritten digits (1797 real scans, values 0-16) as 8-bit grayscale pixels."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # what a PNG would hold
    return RawDataset(pixels, d.target.astype(np.int64), [str(i) for i in range(10)], "image", "sklearn digits")


def load_imagefolder(cfg) -> RawDataset:
    """A directory with one sub-directory of images per class."""
    root = _need_path(cfg)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a directory of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if cfg.class_names:
        unknown = sorted(set(classes) - set(cfg.class_names))
        if unknown:
            raise DataError(f"data.path: folder(s) {', '.join(unknown)} are not in data.class_names")
        classes = list(cfg.class_names)
    if not classes:
        raise DataError(f"data.path: {root} has no class sub-folders")
    files: list[tuple[Path, int]] = []
    for i, c in enumerate(classes):
        d = root / c
        if d.is_dir():
            files += [(f, i) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    odd = [f for f, _ in files if not f.is_file()]
    if odd:  # a FIFO would block the loader forever; a dangling link would silently shrink a class
        raise DataError(f"{odd[0]}: not a regular image file (directory, FIFO, device or broken link)")
    if not files:
        raise DataError(f"data.path: no images (PNG/JPEG/BMP) under {root}")
    # grayscale dataset unless any image has colour
    from PIL import Image

    channels = 1
    for f, _ in files[:200]:
        try:
            with Image.open(f) as im:
                if im.mode not in ("L", "1", "I", "I;16", "P", "LA"):
                    channels = 3
                    break
        except Exception:
            continue
    imgs, ys = [], []
    for f, label in files:
        arr = load_image_file(str(f), channels)
        imgs.append(arr)
        ys.append(label)
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
    _check_labels(y, classes, str(root))
    return RawDataset(x, y, classes, "image", str(root))


def load_csv(cfg) -> RawDataset:
    """Numeric feature columns plus a label column (names or integers)."""
    path = _need_file(cfg)
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
        feats.append(vals)
        labels.append(row[li].strip())
    if cfg.class_names:
        classes = list(cfg.class_names)
        bad = sorted(set(labels) - set(classes))
        if bad:
            raise DataError(f"{path}: label(s) {', '.join(bad[:5])} are not in data.class_names")
    else:
        uniq = sorted(set(labels))
        classes = sorted(uniq, key=int) if all(u.lstrip("-").isdigit() for u in uniq) else uniq
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[v] for v in labels], np.int64)
    x = np.asarray(feats, np.float32)
    _check_labels(y, classes, str(path))
    return RawDataset(x, y, classes, "table", str(path))


def load_npz(cfg) -> RawDataset:
    """An .npz with arrays x (uint8 images N,H,W[,C] or float rows N,F) and y (integer labels)."""
    path = _need_file(cfg)
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
    classes = list(cfg.class_names) if cfg.class_names else [str(i) for i in range(n_cls)]
    if y.min() < 0 or y.max() >= len(classes):
        raise DataError(f"{path}: labels must lie in 0..{len(classes) - 1}, found {int(y.min())}..{int(y.max())}")
    y = y.astype(np.int64)
    _check_labels(y, classes, str(path))
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
