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
any input failed, 2 for usage errors (no model, no inputs). numpy, Pillow and the runtime only:
this module never imports torch or scikit-learn.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecli.artifacts import ArtifactStore
from edgecli.config import PipelineConfig
from edgecli.errors import ModelFileError, UsageError
from edgecli.predict import Model, dumps, top_k
from edgecli.stages import Built, StageResult, Table, run_stage

STAGE = "infer"


def resolve_model(cfg: PipelineConfig, store: ArtifactStore) -> Path:
    """The model file infer.input names (a stage's model.onnx, verified, or a file path)."""
    from edgecli.stages import resolve_model_input

    return resolve_model_input(store, cfg.infer.input, "infer.input", "a model file")


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
            sys.stdout.write(dumps(obj) + "\n")
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
            sys.stdout.write(dumps(obj) + "\n")
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


@dataclass
class Answered:
    """What one infer run did: render's view."""

    path: Path
    sha256: str
    k: int
    rows: list[list]  # the table for people (empty with --json, a stream, or a closed stdout)
    ok: int
    failed: int
    closed: bool  # the reader closed stdout mid-run


def _open(cfg: PipelineConfig, store: ArtifactStore) -> Model:
    """The model infer.input names, through infer.runtime; usage errors for what infer cannot rank."""
    path = resolve_model(cfg, store)
    if cfg.infer.runtime and cfg.infer.runtime != "onnxruntime" and path.name == "model.onnx" and cfg.infer.input == "export":
        from edgecli.runtimes.targets import card_for, target_file, target_files

        store.require("export", "card.json")  # the card and the files it names, each as export published them
        card = card_for(path)
        path = target_file(card, path.parent, cfg.infer.runtime)
        rec = next(t for t in card["targets"] if t.get("file") == path.name)
        for fname in target_files(rec):
            store.require("export", fname)
    model = Model(path, cfg.infer.threads, cfg.infer.providers, cfg.infer.runtime)
    if not model.inputs:
        raise ModelFileError(f"{path}: the model has no inputs")
    if model.is_embedding():
        # top-k of a softmax over embedding dimensions would look like an answer and mean nothing
        raise UsageError(f"infer: {path} is an embedding model (output 'embedding', no labels); "
                         "it has no classes to rank — use bench for its fidelity, or a classifier config")
    return model


def _serve_inputs(cfg: PipelineConfig, model: Model, reader, printer: Printer, inputs: list[str]) -> bool:
    """Answer the files (batched), then stdin's lines one by one; True when the reader closed stdout."""
    files = [a for a in inputs if a != "-"]
    try:
        _answer(model, printer, [reader.argument(a) for a in files], cfg.infer.batch_size)
        if "-" in inputs:
            for lineno, line in enumerate(sys.stdin, start=1):
                if not line.strip():
                    continue
                _answer(model, printer, [reader.json_line(line, f"line {lineno}")], 1)
    except BrokenPipeError:
        # the reader went away (`| head`, a closed socket): the end of the session, not an error;
        # stdout goes to /dev/null so the interpreter's last flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return True
    return False


def render(res: StageResult, a: Answered) -> StageResult:
    """The predictions table, the closed-stdout and failure lines, exit 1 when any input failed."""
    if a.closed:
        res.messages.append(f"infer: stdout was closed after {a.ok} answer(s); stopped")
    if a.rows and not a.closed:
        res.tables.append(Table(f"predictions ({a.path.name}, sha256 {a.sha256[:12]})",
                                ["input", "label", "prob", f"next {a.k - 1}" if a.k > 1 else "next", "batch ms"],
                                a.rows))
    if a.failed:
        res.exit_code = 1
        res.messages.append(f"infer: {a.failed} of {a.ok + a.failed} input(s) failed; {a.ok} answered")
    return res


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False,
        inputs: list[str] | None = None, json_out_stream: bool = False, top_k_override: int | None = None,
        **_: object) -> StageResult:
    """Answer every input; exit code 1 when any input failed. Nothing is published."""
    from edgecli.inputs import reader_for
    from edgecli.report import info as log_info

    inputs = list(inputs or [])

    def build(_w) -> Built:
        if not inputs:
            raise UsageError("infer: no inputs; give image/.npy/.csv files, sentences, or - for JSON lines on stdin")
        if inputs.count("-") > 1:
            raise UsageError("infer: '-' (stdin) given more than once")
        model = _open(cfg, store)
        reader = reader_for(model.info, model.inputs)
        k = top_k_override or cfg.infer.top_k
        if model.labels:
            k = min(k, len(model.labels))  # --top-k 20 on 10 classes: all 10
        printer = Printer(json_out_stream, model, k, "-" in inputs)
        if not quiet:
            log_info(f"infer: {model.path} (sha256 {model.sha256[:16]}...)")
        closed = _serve_inputs(cfg, model, reader, printer, inputs)  # files first, batched; then the stream
        metrics = {"answered": printer.ok, "failed": printer.failed, "model": str(model.path), "model_sha256": model.sha256}
        return Built(metrics=metrics, view=Answered(model.path, model.sha256, k, printer.rows, printer.ok,
                                                    printer.failed, closed))

    return run_stage(store, STAGE, None, build, render)
