"""Datasets, seeded splits and the preprocessing spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecli.data.preprocess import PreprocessSpec
from edgecli.errors import DataError
from edgecli.registry import Entry, Registry

DATASETS = Registry(
    "dataset",
    "data.dataset",
    {
        "digits": Entry("edgecli.data.datasets:load_digits", "scikit-learn's 8x8 handwritten digits (real, 1797 images)"),
        "imagefolder": Entry("edgecli.data.datasets:load_imagefolder", "a folder of class sub-folders of images"),
        "csv": Entry("edgecli.data.datasets:load_csv", "numeric feature columns + a label column"),
        "npz": Entry("edgecli.data.datasets:load_npz", "arrays x and y in an .npz file"),
        "synthetic": Entry("edgecli.data.datasets:load_synthetic", "seeded synthetic data of any shape"),
        "textcsv": Entry("edgecli.data.text:load_textcsv", "text,label CSV for text classification"),
    },
)


@dataclass
class Split:
    x: np.ndarray  # preprocessed model inputs (float32), or raw for text
    y: np.ndarray
    raw: np.ndarray  # the raw samples (as a user holds them)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    spec: PreprocessSpec
    class_names: list[str]
    kind: str
    source: str
    feature_names: list[str] | None = None  # table data: the feature columns by name, in model order
    skipped: list[dict] = field(default_factory=list)  # per-input errors left out (RawDataset.skipped)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def split_indices(y: np.ndarray, val: float, test: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified split: every class is divided in the same proportions."""
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_te = int(round(len(idx) * test))
        n_va = int(round(len(idx) * val))
        te.append(idx[:n_te])
        va.append(idx[n_te : n_te + n_va])
        tr.append(idx[n_te + n_va :])
    out = tuple(np.sort(np.concatenate(p)) for p in (tr, va, te))
    return out  # type: ignore[return-value]


def input_files(cfg) -> dict[str, Path]:
    """Every file the configured dataset's loader reads, by the name the manifest shows.

    The loaders list their files through the same functions (``list_imagefolder``, the text
    directory's train.csv/test.csv), so what a stage declares is what it reads.
    """
    d = cfg.data
    if d.dataset in ("digits", "synthetic"):  # shipped with scikit-learn / generated: versions cover them
        return {}
    from edgecli.data.base import need_path

    root = need_path(d)
    if d.dataset == "imagefolder":
        from edgecli.data.images import list_imagefolder

        _, files = list_imagefolder(root, d.class_names)
        return {f"data:{f.relative_to(root)}": f for f, _ in files}
    if d.dataset == "textcsv" and root.is_dir():
        return {f"data:{n}": root / n for n in ("train.csv", "test.csv") if (root / n).is_file()}
    if ":" in d.dataset or d.dataset not in DATASETS.entries:
        return {"data:path": root} if root.is_file() else {}
    return {f"data:{root.name}": root}


def load_raw(cfg):
    """The pipeline's dataset as raw samples (RawDataset)."""
    loader = DATASETS.load(cfg.data.dataset)
    ds = loader(cfg.data)
    if cfg.data.max_samples and len(ds) > cfg.data.max_samples:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.choice(len(ds), cfg.data.max_samples, replace=False))
        ds.x, ds.y = ds.x[keep], ds.y[keep]
        if getattr(ds, "test_mask", None) is not None:
            ds.test_mask = ds.test_mask[keep]
    if len(ds) < 10:
        raise DataError(f"{ds.source}: only {len(ds)} samples; need at least 10 to split train/val/test")
    return ds


def load_splits(cfg) -> Splits:
    """Load the dataset, split it with the pipeline seed, fit preprocessing on train, apply to all."""
    ds = load_raw(cfg)
    test_mask = getattr(ds, "test_mask", None)  # a dataset that ships its own held-out test file
    if test_mask is not None and test_mask.any():
        rest = np.flatnonzero(~test_mask)
        tr, va, _ = split_indices(ds.y[rest], cfg.data.val_split, 0.0, cfg.seed)
        tr, va, te = rest[tr], rest[va], np.flatnonzero(test_mask)
    else:
        tr, va, te = split_indices(ds.y, cfg.data.val_split, cfg.data.test_split, cfg.seed)
    if len(tr) == 0:
        raise DataError(f"{ds.source}: no training samples after the split")
    # checked before any training: an empty split used to crash after the last epoch
    if len(va) == 0:
        raise DataError(f"data.val_split: {cfg.data.val_split} leaves no validation samples in {ds.source}; "
                        "early stopping and the best epoch need them (use e.g. 0.1)")
    if len(te) == 0:
        raise DataError(f"data.test_split: {cfg.data.test_split} leaves no test samples in {ds.source}; "
                        "the reported accuracy and export parity need them (use e.g. 0.1)")
    if ds.kind == "text":
        from edgecli.data.text import fit_text_spec

        spec = fit_text_spec(cfg, ds)
    else:
        spec = PreprocessSpec.fit(ds.kind, ds.x[tr], cfg.data.preprocess)

    def make(idx: np.ndarray) -> Split:
        raw = ds.x[idx]
        x = spec.apply(raw)
        return Split(x, ds.y[idx], raw)

    return Splits(make(tr), make(va), make(te), spec, ds.class_names, ds.kind, ds.source,
                  getattr(ds, "feature_names", None), list(getattr(ds, "skipped", None) or []))
