"""The model wrapper that infer and serve share: one session opened through the runtime layer,
plus what the model says about itself (preprocessing, labels, which output holds the scores).

``Model(path, threads=, runtime=)`` loads once; ``Model.run(feeds)`` answers one batch with
probabilities and the model's own milliseconds; ``top_k`` ranks one row. numpy and the runtime
only: no torch, no scikit-learn.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import numpy as np

from edgecli.errors import ConfigError, ModelFileError


class Model:
    """One runtime session plus what the model says about itself (loaded once).

    ``runtime`` names any backend of :mod:`edgecli.runtimes` (default: the one that runs the file's
    suffix); ``providers`` reaches backends that take them (ONNX Runtime) and is ignored by others.
    """

    def __init__(self, path: str | Path, threads: int = 1, providers: list[str] | None = None,
                 runtime: str | None = None):
        from edgecli import runtimes
        from edgecli.artifacts import sha256_file

        self.path = path = Path(path)
        self.runtime = runtime or runtimes.for_file(path)
        backend = runtimes.get(self.runtime)
        reason = backend.unavailable()
        if reason:
            raise ConfigError(f"runtime {self.runtime}: {reason}")
        proto_meta = None
        if path.suffix.lower() == ".onnx":
            from edgecli.onnxio import load_onnx

            # guarded: truncated, non-ONNX, escaping external data refused before any runtime sees it
            proto = load_onnx(path, load_external=False)
            proto_meta = {p.key: p.value for p in proto.metadata_props}
        self.sha256 = sha256_file(path)
        kwargs: dict = {"threads": threads}
        if providers and "providers" in inspect.signature(backend.open).parameters:
            kwargs["providers"] = providers
        if path.suffix.lower() in (".onnx", ".ort"):
            self.session = backend.open(path, **kwargs)
            meta = proto_meta if proto_meta is not None else session_metadata(self.session, path)
        else:  # .tflite / .pte / .xml: fed by the names, shapes and precision the export card gives them
            from edgecli.runtimes.targets import open_for_infer

            inner, card = open_for_infer(path, self.runtime, threads)
            from edgecli.runtimes.ort import OrtStyleSession

            # InferSession speaks ONNX Runtime's calls with the card's names, shapes and output types
            self.session = OrtStyleSession(inner, inner.precision, backend=inner.backend)
            meta = {"edgecli.card": json.dumps(card)}
        self.info = model_description(meta, str(path))
        self.out_index = score_output(self.session, path)
        self.inputs = [{"name": t.name, "shape": [d if isinstance(d, int) else None for d in t.shape],
                        "dtype": np.dtype(t.dtype).name} for t in self.session.inputs]
        names = (self.info or {}).get("class_names")
        self.labels = [str(n) for n in names] if names else None
        self.output_names = [t.name for t in self.session.outputs]
        self._warm = False

    def warm_up(self, feeds: dict[str, np.ndarray]) -> None:
        """Run ``feeds`` untimed until the session is steady (measured: the first two runs are slow)."""
        for _ in range(2):
            self.session.run(feeds)
        self._warm = True

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """(probabilities, model milliseconds) for one batch.

        A session's first runs allocate the runtime's buffers and kernels' packed weights (5-15 ms
        for MiniLM, 3-7x its steady time); they run untimed so latency_ms is what a
        deployed, warm model takes for this batch.
        """
        if not self._warm:
            self.warm_up(feeds)
        t0 = time.perf_counter()
        out = self.session.run(feeds)[self.out_index]
        ms = (time.perf_counter() - t0) * 1000.0
        rows = len(next(iter(feeds.values())))
        out = np.asarray(out, dtype=np.float64)
        if out.ndim == 0 or len(out) != rows:  # one answer per input row, or none at all
            raise ValueError(f"the model answered {len(out) if out.ndim else 0} row(s) for a batch of {rows}; "
                             "its output is not sized by the batch")
        if not np.isfinite(out).all():  # NaN probabilities would also make invalid JSON
            raise ValueError("the model's output holds NaN or Inf")
        return to_probs(out), ms

    def zeros(self, rows: int = 1) -> dict[str, np.ndarray]:
        """Feeds of zeros shaped like the model's inputs (symbolic dimensions 1, the batch ``rows``)."""
        return {i["name"]: np.zeros([rows] + [d or 1 for d in i["shape"][1:]], dtype=i["dtype"]) for i in self.inputs}

    def is_embedding(self) -> bool:
        """An embedding model (output 'embedding', no labels): top-k over its dimensions means nothing."""
        return self.labels is None and bool(self.output_names) and self.output_names[0] == "embedding"

    def card(self) -> dict:
        """What a caller needs to know about the model that answers (``GET /v1/model``)."""
        info = self.info or {}
        return {"path": str(self.path), "sha256": self.sha256, "runtime": self.runtime,
                "precision": getattr(self.session, "precision", None), "kind": info.get("kind"),
                "arch": info.get("arch"), "labels": self.labels, "inputs": self.inputs,
                "outputs": self.output_names, "score_output": self.output_names[self.out_index],
                "preprocess": info.get("preprocess")}


def session_metadata(session, path: Path) -> dict[str, str]:
    """A non-ONNX file's metadata: the session's own (``metadata``, or ONNX Runtime's model meta for
    .ort), else the card.json published beside the file."""
    meta = getattr(session, "metadata", None)
    if isinstance(meta, dict):
        return meta
    inner = getattr(session, "sess", None)
    if inner is not None and hasattr(inner, "get_modelmeta"):
        return dict(inner.get_modelmeta().custom_metadata_map)
    card = path.parent / "card.json"
    if card.is_file():
        from edgecli.safeio import CONFIG_LIMIT, read_user_text

        return {"edgecli.card": read_user_text(card, "a model card", CONFIG_LIMIT, ModelFileError)}
    return {}


def model_description(meta: dict[str, str], where: str = "model") -> dict | None:
    """What the model is fed by: the exported card (card.json, embedded in the model), else the
    model_info that train/compress wrote; None for a model without edgecli metadata.

    Both are checked (``parse_model_info``): malformed metadata is a one-line model error."""
    from edgecli.onnxio import parse_model_info

    for key in ("edgecli.card", "edgecli.model_info"):
        d = parse_model_info(meta.get(key), where) if key == "edgecli.model_info" else _card(meta.get(key), where)
        if isinstance(d, dict) and d.get("preprocess"):
            return d
    return None


def _card(text: str | None, where: str) -> dict | None:
    from edgecli.onnxio import parse_model_info

    try:
        return parse_model_info(text, where)
    except ModelFileError as e:
        raise ModelFileError(e.message.replace("edgecli.model_info", "edgecli.card")) from None


def score_output(session, path) -> int:
    """Which output is ranked: the first float tensor.

    A converted scikit-learn classifier's first output is the integer label and its scores come second;
    ranking the label as if it were a score answers "0, prob 1.0" for everything.
    """
    kinds = _output_kinds(session)
    for i, (_, is_float) in enumerate(kinds):
        if is_float:
            return i
    shown = ", ".join(f"{n} ({t})" for n, t in _output_types(session)) or "none"
    raise ModelFileError(f"{path}: no output holds float scores to rank (outputs: {shown[:200]}); "
                         "infer ranks classifier scores or logits")


_ORT_FLOATS = ("tensor(float)", "tensor(double)", "tensor(float16)")


def _output_types(session) -> list[tuple[str, str]]:
    inner = getattr(session, "sess", None)
    if inner is not None and hasattr(inner, "get_outputs"):
        # ONNX Runtime's own type strings: a ZipMap's seq(map(...)) is not a float tensor, whatever
        # dtype the runtime layer's table falls back to for it
        return [(o.name, o.type) for o in inner.get_outputs()]
    return [(t.name, np.dtype(t.dtype).name) for t in session.outputs]


def _output_kinds(session) -> list[tuple[str, bool]]:
    return [(n, t in _ORT_FLOATS or (not t.startswith(("tensor(", "seq(", "map(")) and np.dtype(t).kind == "f"))
            for n, t in _output_types(session)]


def to_probs(out: np.ndarray) -> np.ndarray:
    """Softmax of logits; outputs that are already probabilities pass unchanged."""
    out = out.reshape(len(out), -1)
    if out.size and out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        return out
    z = out - out.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, k: int, labels: list[str] | None) -> list[dict]:
    """The ``k`` most probable classes of one row: [{"label", "index", "prob"}], most probable first."""
    k = min(k, len(probs))
    idx = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i] if labels and i < len(labels) else str(int(i)), "index": int(i),
             "prob": round(float(probs[i]), 6)} for i in idx]


def dumps(obj) -> str:
    """Strict JSON (never NaN) for one answer line."""
    return json.dumps(obj, allow_nan=False)
