"""What every dataset loader shares: the raw dataset type, path checks and label checks.

A leaf module (numpy and errors only), so loaders of any kind (images, tables, text) import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecli.errors import DataError


@dataclass
class RawDataset:
    x: np.ndarray  # image: uint8 (N, H, W, C); table: float32 (N, F); text: object (N,)
    y: np.ndarray  # int64 (N,)
    class_names: list[str]
    kind: str  # "image" | "table" | "text"
    source: str
    feature_names: list[str] | None = None  # table: the CSV's feature columns, in the order the model takes them
    # inputs left out as per-input errors (an imagefolder's unreadable image or decompression bomb):
    # [{"file": path relative to data.path, "error": the one-line reason}], reported by train
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)


def need_path(cfg) -> Path:
    if not cfg.path:
        raise DataError(f"data.path: dataset '{cfg.dataset}' needs a path")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise DataError(f"data.path: {p} does not exist")
    return p


def need_file(cfg) -> Path:
    p = need_path(cfg)
    # a FIFO or a device (/dev/zero) would block or never end; only regular files are data
    if not p.is_file():
        raise DataError(f"data.path: {p} is not a regular file")
    return p


def check_labels(y: np.ndarray, class_names: list[str], source: str) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    empty = [class_names[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{source}: class(es) with zero samples: {', '.join(empty[:5])}")
    if len(class_names) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {len(class_names)}")


def label_key(v: str) -> str:
    """One spelling per numeric label: ``1``, ``1.0`` and `` 1 `` are one class (``"1"``)."""
    s = v.strip()
    try:
        f = float(s)
    except ValueError:
        return s
    if np.isfinite(f) and f == int(f):
        return str(int(f))
    return s


def class_order(labels: list[str], class_names, source: str) -> tuple[list[str], dict[str, int]]:
    """(class names, label -> index) for label cells as read.

    The rule (README, "Your own data"): with ``data.class_names`` given as a list, its order is the
    class order and every label must be one of them; given as a mapping ``{0: malignant, 1: benign}``,
    numeric labels are the indices and the names are shown. Without it, integer labels sort by
    value and any other labels alphabetically.
    """
    keys = [label_key(v) for v in labels]
    if isinstance(class_names, dict):
        try:
            mapping = {int(label_key(str(k))): str(v) for k, v in class_names.items()}
        except ValueError:
            raise DataError("data.class_names: a mapping must have integer labels as keys ({0: cat, 1: dog})") from None
        n = max(mapping) + 1
        missing = [i for i in range(n) if i not in mapping]
        if missing or min(mapping) < 0:
            raise DataError(f"data.class_names: the mapping must name every label 0..{n - 1} (missing {missing[:5]})")
        names = [mapping[i] for i in range(n)]
        index = {str(i): i for i in range(n)}
        index.update({nm: i for i, nm in enumerate(names)})
        bad = sorted(set(keys) - set(index))
        if bad:
            raise DataError(f"{source}: label(s) {', '.join(bad[:5])} are not keys of data.class_names")
        return names, index
    if class_names:
        classes = [str(c) for c in class_names]
        index = {c: i for i, c in enumerate(classes)}
        index.update({label_key(c): i for i, c in enumerate(classes)})
        bad = sorted(set(keys) - set(index))
        if bad:
            raise DataError(f"{source}: label(s) {', '.join(bad[:5])} are not in data.class_names")
        return classes, index
    uniq = sorted(set(keys))
    classes = sorted(uniq, key=int) if all(u.lstrip("-").isdigit() for u in uniq) else uniq
    return classes, {c: i for i, c in enumerate(classes)}
