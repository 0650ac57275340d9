"""Text data: the ``textcsv`` dataset kind and the tokenizer part of the preprocessing spec.

Only the standard library and numpy at import time; the ``tokenizers`` package (the ``text``
extra) is imported when a sentence is tokenised, never torch or transformers, so ``infer`` can
take raw sentences with the exact tokenisation training used.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from edgecli.data.base import RawDataset, check_labels, class_order, label_key
from edgecli.data.tokens import (  # noqa: F401 - re-exported: callers import them from here
    _TOKENIZERS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODEL_PACKAGE,
    INPUT_NAMES,
    _sha256,
    default_model_dir,
    load_tokenizer,
    resolve_model_dir,
    tokenize,
    tokenizer_ref,
)
from edgecli.errors import DataError

# --------------------------------------------------------------------------- dataset


def _read_textcsv(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    if Path(path).exists() and not Path(path).is_file():  # a FIFO or /dev/zero would never end
        raise DataError(f"data.path: {path} is not a regular file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: cannot read {path} ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV ({e})") from None
    if not header:
        raise DataError(f"data.path: {path} is empty")
    header = [h.strip() for h in header]
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in header:
            raise DataError(f"{key}: '{col}' is not a column of {path} (columns: {', '.join(header[:8])})")
    ti, li = header.index(text_col), header.index(label_col)
    texts, labels = [], []
    for n, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} columns, got {len(row)} (quote texts that hold commas)")
        text, label = row[ti].strip(), row[li].strip()
        if not text:
            raise DataError(f"{path}:{n}: empty text")
        if not label:
            raise DataError(f"{path}:{n}: empty label")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError(f"data.path: {path} has no data rows")
    return texts, labels


def load_textcsv(cfg) -> RawDataset:
    """Sentences and labels from CSV (columns data.text_column, data.label_column).

    ``data.path`` is one CSV (split at random into train/val/test), or a directory holding
    train.csv and test.csv: then test.csv is the held-out test split (written from other
    templates in the shipped intent set) and val is drawn from train.csv.
    """
    if not cfg.path:
        raise DataError("data.path: dataset 'textcsv' needs a CSV file or a directory with train.csv/test.csv")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise DataError(f"data.path: {p} does not exist")
    files = [p]
    if p.is_dir():
        files = [p / "train.csv"] + ([p / "test.csv"] if (p / "test.csv").is_file() else [])
        if not files[0].is_file():
            raise DataError(f"data.path: directory {p} has no train.csv")
    texts, labels, is_test = [], [], []
    for i, f in enumerate(files):
        t, lab = _read_textcsv(f, cfg.text_column, cfg.label_column)
        texts += t
        labels += lab
        is_test += [i == 1] * len(t)
    classes, index = class_order(labels, cfg.class_names, str(p))
    y = np.asarray([index[label_key(v)] for v in labels], np.int64)
    x = np.empty(len(texts), dtype=object)
    x[:] = texts
    check_labels(y, classes, str(p))
    ds = RawDataset(x, y, classes, "text", str(p))
    if len(files) == 2:
        # read by edgecli.data.load_splits: these rows form the test split, whatever test_split says
        ds.test_mask = np.asarray(is_test, dtype=bool)
    return ds


def fit_text_spec(cfg, ds: RawDataset):
    """The text preprocessing spec: tokenizer reference and max length, carried to card.json.

    The tokenizer belongs to the pretrained model, so it comes from ``model.args.model_dir``
    (default: the packaged all-MiniLM-L6-v2) and the length from ``model.args.max_length``.
    """
    from edgecli.data.preprocess import PreprocessSpec

    args = cfg.model.args or {}
    max_length = int(args.get("max_length", DEFAULT_MAX_LENGTH))
    if not 8 <= max_length <= 512:
        raise DataError(f"model.args.max_length: {max_length} must lie in 8..512 (the encoder has 512 positions)")
    ref = tokenizer_ref(resolve_model_dir(args.get("model_dir")))
    extra = {"tokenizer": ref, "max_length": max_length, "input_names": list(INPUT_NAMES)}
    return PreprocessSpec("text", [], [max_length], extra=extra)
