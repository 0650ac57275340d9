"""infer: raw inputs in, top-k labels with probabilities out, through exactly the model's preprocessing.

    edgecli infer -c CONFIG digit1.png digit2.png rows.csv batch.npy
    producer | edgecli infer -c CONFIG --json -        # JSON lines in, one JSON line out per request

The model is ``infer.input`` (default: the export stage; any stage name or an .onnx/.ort path).
Its ``edgecli.model_info`` metadata gives the preprocessing and label names, so a PNG, a CSV row
or a sentence goes through the very preprocessing training used (see edgecli/inputs.py for every
accepted input and the JSON request format: {"id": .., "pixels": [[..]]}, {"features": [..]},
{"text": ".."}, {"path": "x.png"}, {"input": [..]}).

Output: a table for people, or with ``--json`` one object per input and line:
``{"input": "a.png", "id": .., "top_k": [{"label": "7", "index": 7, "prob": 0.98}, ...],
"latency_ms": 0.04, "batch": 12, "model_sha256": "..."}``; ``latency_ms`` is the model's own time
(``sess.run``, warm: the session's first runs are repeated untimed) for the batch that answered
the input (``batch`` rows). With ``-`` each line is
answered and flushed as soon as it is read (real-time behind a pipe; one session for the stream).

Bad input never stops the run: each problem is one line on stderr naming the input (and with
--json an {"input", "error"} object on stdout); the others are answered; the exit code is 1 when
any input failed, 2 for usage errors (no model, no inputs). numpy, Pillow and ONNX Runtime only:
this module never imports torch or scikit-learn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgecli.artifacts import STAGES, ArtifactStore, sha256_file
from edgecli.config import PipelineConfig
from edgecli.errors import ConfigError, ModelFileError, UsageError
from edgecli.stages import StageResult, Table

STAGE = "infer"


def resolve_model(cfg: PipelineConfig, store: ArtifactStore) -> Path:
    """The model file infer.input names (a stage's model.onnx, verified, or a file path)."""
    from edgecli.stages import resolve_input

    ref = cfg.infer.input
    if ref in STAGES and ref not in ("train", "compress", "export"):
        raise ConfigError(f"infer.input: '{ref}' has no model; use export, compress, train or an .onnx path")
    _, path = resolve_input(store, ref, ("export", "compress", "train"), "infer.input")
    return path


class Model:
    """One ONNX Runtime session plus what the model says about itself (loaded once)."""

    def __init__(self, path: Path, threads: int, providers: list[str], runtime: str | None = None):
        from edgecli import runtimes
        from edgecli.runtime import make_session

        self.path = path
        backend = runtime or runtimes.for_file(path)
        if backend != "onnxruntime":  # .tflite / .pte / .xml: described by the card.json beside them
            from edgecli.runtimes.targets import open_for_infer

            self.sha256 = sha256_file(path)
            self.sess, card = open_for_infer(path, backend, threads)
            self._describe(model_description({"edgecli.card": json.dumps(card)}, str(path)), path)
            return
        if path.suffix.lower() != ".ort":
            from edgecli.onnxio import load_onnx

            load_onnx(path, load_external=False)  # guarded: truncated, non-ONNX, escaping data refused
        self.sha256 = sha256_file(path)
        self.sess = make_session(path, threads=threads, providers=providers)
        self._describe(model_description(self.sess.get_modelmeta().custom_metadata_map, str(path)), path)

    def _describe(self, info: dict | None, path: Path) -> None:
        self.info = info
        self.out_index = score_output(self.sess.get_outputs(), path)
        self.inputs = [{"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape],
                        "dtype": _ORT_DTYPES.get(i.type, "float32")} for i in self.sess.get_inputs()]
        names = (self.info or {}).get("class_names")
        self.labels = [str(n) for n in names] if names else None
        self._warm = False

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """(probabilities, model milliseconds) for one batch.

        A session's first runs allocate ONNX Runtime's buffers and kernels' packed weights (5-15 ms
        for MiniLM, 3-7x its steady time); they run untimed so latency_ms is what a
        deployed, warm model takes for this batch.
        """
        if not self._warm:
            for _ in range(2):  # measured: the first two runs are slow, the third is steady
                self.sess.run(None, feeds)
            self._warm = True
        t0 = time.perf_counter()
        out = self.sess.run(None, feeds)[self.out_index]
        ms = (time.perf_counter() - t0) * 1000.0
        rows = len(next(iter(feeds.values())))
        out = np.asarray(out, dtype=np.float64)
        if out.ndim == 0 or len(out) != rows:  # one answer per input row, or none at all
            raise ValueError(f"the model answered {len(out) if out.ndim else 0} row(s) for a batch of {rows}; "
                             "its output is not sized by the batch")
        if not np.isfinite(out).all():  # NaN probabilities would also make invalid JSON
            raise ValueError("the model's output holds NaN or Inf")
        return to_probs(out), ms


def model_description(meta: dict[str, str], where: str = "model") -> dict | None:
    """What infer feeds the model by: the exported card (card.json, embedded in the model), else the
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


def score_output(outputs, path) -> int:
    """Which output infer ranks: the first float tensor with a row per input.

    A converted scikit-learn classifier's first output is the integer label and its scores come second;
    ranking the label as if it were a score answers "0, prob 1.0" for everything.
    """
    floats = ("tensor(float)", "tensor(double)", "tensor(float16)")
    for i, o in enumerate(outputs):
        if o.type in floats:
            return i
    kinds = ", ".join(f"{o.name} ({o.type})" for o in outputs) or "none"
    raise ModelFileError(f"{path}: no output holds float scores to rank (outputs: {kinds[:200]}); "
                         "infer ranks classifier scores or logits")


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
               "tensor(bool)": "bool"}


def to_probs(out: np.ndarray) -> np.ndarray:
    """Softmax of logits; outputs that are already probabilities pass unchanged."""
    out = out.reshape(len(out), -1)
    if out.size and out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        return out
    z = out - out.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, k: int, labels: list[str] | None) -> list[dict]:
    k = min(k, len(probs))
    idx = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i] if labels and i < len(labels) else str(int(i)), "index": int(i),
             "prob": round(float(probs[i]), 6)} for i in idx]


class Printer:
    """Writes each answer or error at once (stdout results, stderr errors), flushing for pipes."""

    def __init__(self, json_out: bool, model: Model, k: int, stream: bool):
        self.json_out, self.model, self.k, self.stream = json_out, model, k, stream
        self.rows: list[list] = []
        self.ok = self.failed = 0

    def answer(self, name: str, rid, probs: np.ndarray, ms: float, batch: int) -> None:
        tk = top_k(probs, self.k, self.model.labels)
        if self.json_out:
            obj = {"input": name}
            if rid is not None:
                obj["id"] = rid
            obj.update(top_k=tk, latency_ms=round(ms, 4), batch=batch, model_sha256=self.model.sha256)
            sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
            sys.stdout.flush()
        elif self.stream:
            preds = ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in tk)
            sys.stdout.write(f"{name}: {preds}\n")
            sys.stdout.flush()
        else:
            self.rows.append([name, tk[0]["label"], tk[0]["prob"],
                              ", ".join(f"{t['label']} {t['prob']:.3f}" for t in tk[1:]) or "-", round(ms, 4)])
        self.ok += 1  # counted once delivered: a closed pipe mid-write is not an answer

    def error(self, name: str, rid, msg: str) -> None:
        from edgecli.safeio import one_line

        self.failed += 1
        print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)  # a newline in a name forges no line
        if self.json_out:
            obj = {"input": name}
            if rid is not None:
                obj["id"] = rid
            obj.update(error=msg, model_sha256=self.model.sha256)
            sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
            sys.stdout.flush()


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _answer(model: Model, printer: Printer, samples: list, batch_size: int) -> None:
    """Run valid samples in batches (consecutive samples with equal input shapes share a batch)."""
    pending: list = []

    def flush():
        if not pending:
            return
        keys = list(pending[0].feeds)
        feeds = {k: np.concatenate([s.feeds[k] for s in pending]) for k in keys}
        try:
            probs, ms = model.run(feeds)
        except Exception as e:  # noqa: BLE001 - ORT's own shape/type errors: answer each input alone
            if len(pending) > 1:
                one = list(pending)
                pending.clear()
                for s in one:
                    _answer(model, printer, [s], 1)
                return
            s = pending[0]
            printer.error(s.name, s.id, f"{s.name}: the model rejected this input ({_first_line(e)})")
            pending.clear()
            return
        n = len(probs)
        if n != sum(s.n for s in pending):
            for s in pending:
                printer.error(s.name, s.id, f"{s.name}: the model answered {n} row(s) for {sum(x.n for x in pending)} input row(s)")
            pending.clear()
            return
        i = 0
        for s in pending:
            for j in range(s.n):
                printer.answer(s.names[j], s.id, probs[i], ms, n)
                i += 1
        pending.clear()

    rows = 0
    for s in samples:
        if s.error:
            flush()
            rows = 0
            printer.error(s.name, s.id, s.error)
            continue
        shapes = {k: v.shape[1:] for k, v in s.feeds.items()}
        if pending and ({k: v.shape[1:] for k, v in pending[0].feeds.items()} != shapes or rows + s.n > batch_size):
            flush()
            rows = 0
        pending.append(s)
        rows += s.n
    flush()


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False,
        inputs: list[str] | None = None, json_out_stream: bool = False, top_k_override: int | None = None,
        **_: object) -> StageResult:
    """Answer every input; exit code 1 when any input failed. Nothing is published."""
    from edgecli.inputs import reader_for
    from edgecli.report import info as log_info

    t0 = time.time()
    inputs = list(inputs or [])
    if not inputs:
        raise UsageError("infer: no inputs; give image/.npy/.csv files, sentences, or - for JSON lines on stdin")
    if inputs.count("-") > 1:
        raise UsageError("infer: '-' (stdin) given more than once")
    path = resolve_model(cfg, store)
    if cfg.infer.runtime and cfg.infer.runtime != "onnxruntime" and path.name == "model.onnx" and cfg.infer.input == "export":
        from edgecli.runtimes.targets import card_for, target_file

        path = target_file(card_for(path), path.parent, cfg.infer.runtime)
    model = Model(path, cfg.infer.threads, cfg.infer.providers, cfg.infer.runtime)
    if not model.inputs:
        raise ModelFileError(f"{path}: the model has no inputs")
    outs = [o.name for o in model.sess.get_outputs()]
    if model.labels is None and outs and outs[0] == "embedding":
        # top-k of a softmax over embedding dimensions would look like an answer and mean nothing
        raise UsageError(f"infer: {path} is an embedding model (output 'embedding', no labels); "
                         "it has no classes to rank — use bench for its fidelity, or a classifier config")
    reader = reader_for(model.info, model.inputs)
    k = top_k_override or cfg.infer.top_k
    if model.labels:
        k = min(k, len(model.labels))  # --top-k 20 on 10 classes: all 10
    stream = "-" in inputs
    printer = Printer(json_out_stream, model, k, stream)
    if not quiet:
        log_info(f"infer: {path} (sha256 {model.sha256[:16]}...)")
    files = [a for a in inputs if a != "-"]
    # files first, batched; then the stream, one request at a time as lines arrive
    closed = False
    try:
        _answer(model, printer, [reader.argument(a) for a in files], cfg.infer.batch_size)
        if stream:
            for lineno, line in enumerate(sys.stdin, start=1):
                if not line.strip():
                    continue
                _answer(model, printer, [reader.json_line(line, f"line {lineno}")], 1)
    except BrokenPipeError:
        # the reader went away (`| head`, a closed socket): the end of the session, not an error;
        # stdout goes to /dev/null so the interpreter's last flush does not complain either
        closed = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    res = StageResult(STAGE, "done", None, time.time() - t0)
    if closed:
        res.messages.append(f"infer: stdout was closed after {printer.ok} answer(s); stopped")
        printer.rows.clear()
    res.metrics = {"answered": printer.ok, "failed": printer.failed, "model": str(path), "model_sha256": model.sha256}
    if printer.rows:
        res.tables.append(Table(f"predictions ({path.name}, sha256 {model.sha256[:12]})",
                                ["input", "label", "prob", f"next {k - 1}" if k > 1 else "next", "batch ms"],
                                printer.rows))
    if printer.failed:
        res.exit_code = 1
        res.messages.append(f"infer: {printer.failed} of {printer.ok + printer.failed} input(s) failed; "
                            f"{printer.ok} answered")
    return res
