"""One module per stage, each exposing ``run(cfg, store, ...) -> StageResult``.

Shared pieces are plain functions here: the result type and the one run skeleton, ``run_stage``.
A stage's ``run`` checks its config, declares its inputs, and hands two functions to ``run_stage``::

    def run(cfg, store, *, force=False, quiet=False):
        decl = declare(cfg)                                   # artifacts.Declared: the fingerprint
        def build(w: StageWriter) -> Built:                   # writes into w.dir; returns what it made
            ...
            return Built(cfg.section("x"), metrics, view=report)
        return run_stage(store, "x", decl, build, render, force=force)

    def render(res: StageResult, view) -> StageResult:        # tables, details, messages, exit code
        ...

``render`` is one function for a fresh run and a skipped one alike: ``view`` is ``Built.view`` when
the stage ran, and ``load(stage_dir)`` when it was up to date (None without ``load``). It reads
``res`` and ``view`` and touches no file. A stage that publishes nothing (infer, serve) passes
``inputs=None``: no lock, no stage directory, ``build(None)``. compress and export pass a function
as ``inputs``: it resolves their upstream model with the run lock held, and ``build`` reads what it
resolved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecli.artifacts import ArtifactStore, Declared, StageWriter
from edgecli.errors import ArtifactError, ConfigError, ModelFileError


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class StageResult:
    stage: str
    status: str  # "done" | "skipped"
    dir: Path | None
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    tables: list[Table] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)  # shown on stderr after the run
    exit_code: int = 0
    failure: str | None = None  # a failed check, reported after the results (exit 1)

    def to_json(self) -> dict:
        return {
            "stage": self.stage,
            "status": self.status,
            "dir": str(self.dir) if self.dir else None,
            "seconds": round(self.seconds, 3),
            "metrics": self.metrics,
            "outputs": self.outputs,
            "details": self.details,
            "messages": self.messages,
            "exit_code": self.exit_code,
            "failure": self.failure,
        }


def skipped_result(store: ArtifactStore, stage: str) -> StageResult:
    m = store.manifest(stage)
    return StageResult(
        stage, "skipped", store.stage_dir(stage),
        metrics=m.get("metrics", {}),
        outputs={k: (store.stage_dir(stage) / k).stat().st_size for k in m.get("outputs", {})},
        messages=[f"{stage} is up to date (config and inputs unchanged); skipped. Use --force to rerun."],
    )


@dataclass
class Built:
    """What a stage's ``build`` returns: the manifest's parts, and what ``render`` shows."""

    config: dict = field(default_factory=dict)  # the stage's config section, as recorded
    metrics: dict = field(default_factory=dict)  # headline metrics (manifest and StageResult)
    extra: dict = field(default_factory=dict)  # further manifest fields
    view: Any = None  # for render: the stage's report, results or card
    notes: list[str] = field(default_factory=list)  # shown on stderr before the run's own messages


def run_stage(store: ArtifactStore, name: str, inputs: Declared | Callable[[], Declared] | None,
              build: Callable[[StageWriter | None], Built], render: Callable[[StageResult, Any], StageResult], *,
              force: bool = False, command: str = "", load: Callable[[Path], Any] | None = None) -> StageResult:
    """The one run skeleton: lock, fingerprint from the declared ``inputs``, skip or build, publish, render.

    ``inputs`` (or a function returning it, called with the lock held) is the stage's
    ``artifacts.Declared`` record; None for a stage that publishes nothing. ``build(writer)`` writes
    into ``writer.dir`` and returns a ``Built``; anything it raises discards the temp dir. ``render(res,
    view)`` fills the result's tables and messages, for "done" (view = ``Built.view``) and "skipped"
    (view = ``load(stage dir)``) alike. See the module docstring for a whole stage.
    """
    t0 = time.time()
    if inputs is None:
        built = build(None)
        res = StageResult(name, "done", None, time.time() - t0, metrics=built.metrics, messages=list(built.notes))
        return render(res, built.view)
    res, built = _lock_and_publish(store, name, inputs, force, build, command=command)
    if built is not None:
        res.messages = built.notes + res.messages
        return render(res, built.view)
    return render(res, load(res.dir) if load is not None and res.dir is not None else None)


def _lock_and_publish(store: ArtifactStore, stage: str, inputs: Declared | Callable[[], Declared], force: bool,
                      build: Callable[[StageWriter], Built], *, command: str = "") -> tuple[StageResult, Built | None]:
    """Lock the run, skip when up to date, build into a temp dir, publish atomically: ``run_stage``'s core.

    Returns the result and what ``build`` made (None when skipped). Any exception (or Ctrl-C) in
    ``build`` discards the temp dir: nothing half-written is published. ``inputs`` may be a function:
    it is then called with the lock held, so a stage that resolves its input there cannot read an
    upstream stage another process is publishing at that moment. The fingerprint is the hash of the
    inputs the record declares (each file's sha256, through the run's hash cache), and the manifest
    lists the same.
    """
    with store.lock(command or f"edgecli {stage}"):
        decl = inputs() if callable(inputs) else inputs
        declared = decl.digests(store)
        fingerprint = decl.fingerprint(*declared)
        if not force and store.up_to_date(stage, fingerprint):
            res = skipped_result(store, stage)
            decl.save_cache()
            if getattr(store, "stale_lock_message", ""):
                res.messages.append(store.stale_lock_message)
            return res, None
        t0 = time.time()
        w = store.begin(stage)
        w.fingerprint = fingerprint
        w.inputs.update(declared[0])
        w.upstream.update(declared[1])
        try:
            built = build(w)
            final = store.publish(w, config=built.config, fingerprint=fingerprint, metrics=built.metrics,
                                  extra=built.extra)
        except BaseException:
            store.discard(w)
            raise
        decl.save_cache()
        outputs = {p.name: p.stat().st_size for p in sorted(final.iterdir()) if p.is_file()}
        res = StageResult(stage, "done", final, time.time() - t0, metrics=built.metrics, outputs=outputs)
        if getattr(store, "stale_lock_message", ""):
            res.messages.append(store.stale_lock_message)
        return res, built


def declare_data(decl: Declared, cfg) -> None:
    """Declare every file of the pipeline's dataset; a dataset that cannot be listed is declared as such.

    compress and export fall back to other inputs when the pipeline's data does not fit (or is not
    there); the reason is part of the record, so the stage reruns once the data appears.
    """
    from edgecli.data import input_files
    from edgecli.errors import EdgeError

    try:
        files = input_files(cfg)
    except EdgeError as e:
        decl.values["data"] = "unavailable: " + e.message
        return
    for name, p in files.items():
        decl.file(name, p)


def declare_model(decl: Declared, stage: str | None, path: Path) -> None:
    """The stage's input model: the upstream stage's manifest, or the ONNX file and its external data."""
    if stage:
        decl.stage_input(stage)
        return
    from edgecli.onnxio import model_files

    for p in model_files(path):
        decl.file(f"file:{p.name}", p)


def resolve_model_input(store: ArtifactStore, ref: str | None, key: str, what: str) -> Path:
    """The model file infer/serve read: a model stage's model.onnx (export, compress, train; verified) or a
    file path. ``what`` names the files a path may be in the error for a stage without a model."""
    from edgecli.artifacts import STAGES

    if ref in STAGES and ref not in ("train", "compress", "export"):
        raise ConfigError(f"{key}: '{ref}' has no model; use export, compress, train or {what}")
    from edgecli.runtimes import SUFFIXES

    p = Path(ref).expanduser() if ref is not None and ref not in STAGES else None
    if p is not None and p.suffix.lower() in SUFFIXES and p.suffix.lower() not in (".onnx", ".ort"):
        # an export target (.tflite, .pte, .xml): not ONNX, so not ONNX Runtime's probe; its runtime
        # opens it with the card.json beside it (edgecli.runtimes.targets.open_for_infer)
        from edgecli.safeio import open_user_file

        with open_user_file(p, f"a {p.suffix} model", 1 << 62, ArtifactError) as f:  # regular file, never blocks
            if not f.read(8):
                raise ModelFileError(f"{p}: empty file, not a {p.suffix} model")
        from edgecli.runtimes import for_file, get
        from edgecli.runtimes.targets import probe_target

        if not get(for_file(p)).unavailable():  # not installed: the caller's one line names the extra
            probe_target(p, for_file(p))
        return p
    return resolve_input(store, ref, ("export", "compress", "train"), key)[1]


def resolve_input(store: ArtifactStore, ref: str | None, default_order: tuple[str, ...], key: str) -> tuple[str | None, Path]:
    """A stage's input: (stage name or None, path to model.onnx).

    ``ref`` is a stage name or a path to an .onnx file; when None, the first published stage in
    ``default_order`` is used.
    """
    from edgecli.artifacts import STAGES

    if ref is None:
        for st in default_order:
            if store.exists(st):
                return st, store.require(st, "model.onnx")
        raise ArtifactError(
            f"{key}: none of {', '.join(default_order)} has been run for '{store.name}'",
            hint=f"run `edgecli {default_order[-1]} -c <config>` first",
        )
    if ref in STAGES:
        return ref, store.require(ref, "model.onnx")
    p = Path(ref).expanduser()
    if p.suffix.lower() not in (".onnx", ".ort") and not p.exists():
        from edgecli.registry import did_you_mean

        raise ArtifactError(f"{key}: '{ref}' is neither a stage ({', '.join(STAGES[:3])}){did_you_mean(ref, STAGES)} nor a model file")
    if not p.exists():
        raise ArtifactError(f"{key}: model file {p} does not exist")
    from edgecli.onnxio import probe_model

    # a model from elsewhere (.onnx or .ort): a crash in ONNX Runtime kills a child, not edgecli; a FIFO,
    # a device or a model with no inputs is a one-line model error here, for every stage alike
    probe_model(p)
    return None, p


def stale_upstream_notes(cfg, store: ArtifactStore, upstream: tuple[str, ...]) -> list[str]:
    """Notes when a published upstream stage was built from another config section than the current one.

    Stages chain by artifacts, like make: compress reads the *published* train stage. When the user
    has since edited `train:` without rerunning train, say so instead of silently using the old model.
    """
    notes = []
    for st in upstream:
        if not store.exists(st):
            continue
        try:
            published = store.manifest(st).get("config")
        except ArtifactError:
            continue
        if published is not None and published != cfg.section(st):
            notes.append(f"note: the published {st} stage was built from a different `{st}:` config than "
                         f"this one; run `edgecli {st} -c {cfg.source}` to rebuild it first")
    return notes
