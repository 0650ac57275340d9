"""bench's side of the worker protocol: the test split written for the workers, one WorkerSpec per
model x provider x thread count, ``bench.repeats`` fresh processes in interleaved order, and each
merged WorkerResult turned into results.json's measurement and rows.

The worker (edgecli/benchworker.py) measures; edgecli/runtimes/worker.py holds the contract and
pools repeats; this module plans and records. The bench stage calls ``measure``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecli.config import PipelineConfig
from edgecli.errors import CheckFailed, ConfigError, ModelFileError
from edgecli.runtimes.worker import WorkerResult, WorkerSpec, latency_stats, merge_repeats
from edgecli.runtimes.worker import run_worker as launch_worker


@dataclass
class Target:
    """One model to measure: an ONNX file, or the PyTorch eager baseline (weights + architecture)."""

    label: str
    kind: str  # "onnx" | "torch"
    path: Path
    stage: str | None
    info: dict | None
    size_bytes: int
    runtime: dict | None = None  # kind "runtime": backend, precision, input names (edgecli.runtimes.targets)


def _write_inputs(cfg: PipelineConfig, targets: list[Target], tmp: Path) -> tuple[dict[str, str | None], str | None, int, list[str]]:
    """Preprocess the test split once per distinct preprocessing spec; (x path per label, y path, classes, notes)."""
    from edgecli.data import load_splits
    from edgecli.data.preprocess import PreprocessSpec
    from edgecli.errors import DataError

    splits = load_splits(cfg)
    test = splits.test
    notes: list[str] = []
    if isinstance(test.x, dict):
        # text: the tokenizer's arrays, one per model input; the worker trims each timed batch to
        # its own longest sentence, as infer does, and records that sequence length
        y_path = tmp / "y.npy"
        np.save(y_path, np.asarray(test.y, dtype=np.int64))
        x_path = tmp / "x0.npz"
        np.savez(x_path, **{k: np.ascontiguousarray(v) for k, v in test.x.items()})
        return {t.label: str(x_path) for t in targets}, str(y_path), splits.num_classes, notes
    if not isinstance(test.x, np.ndarray) or not np.issubdtype(test.x.dtype, np.number):
        notes.append("the test split is not a numeric array: models are timed on synthetic inputs, accuracy not measured")
        return {t.label: None for t in targets}, None, splits.num_classes, notes
    y_path = tmp / "y.npy"
    np.save(y_path, np.asarray(test.y, dtype=np.int64))
    own = json.dumps(splits.spec.to_dict(), sort_keys=True)
    cache: dict[str, str] = {}

    def save(key: str, x: np.ndarray) -> str:
        if key not in cache:
            p = tmp / f"x{len(cache)}.npy"
            np.save(p, np.ascontiguousarray(x))
            cache[key] = str(p)
        return cache[key]

    xs: dict[str, str | None] = {}
    for t in targets:
        pre = (t.info or {}).get("preprocess")
        key = json.dumps(pre, sort_keys=True) if pre else own
        if key == own:
            xs[t.label] = save(own, test.x)
            continue
        try:  # a model from another pipeline: apply the preprocessing it was trained with
            spec = PreprocessSpec.from_dict(pre)
            spec.check_raw(test.raw, "test split")
            xs[t.label] = save(key, spec.apply(test.raw))
        except (DataError, TypeError, ValueError, KeyError):
            notes.append(f"{t.label}: its preprocessing does not apply to this pipeline's data; using the pipeline's")
            xs[t.label] = save(own, test.x)
    return xs, str(y_path), splits.num_classes, notes


# --------------------------------------------------------------------------- workers


def run_worker(spec: WorkerSpec, tmp: Path, label: str) -> WorkerResult:
    """Measure in a fresh ``python -m edgecli.benchworker`` process; its result, or a one-line error."""
    idx = len(list(tmp.glob("spec*.json")))
    res = launch_worker(spec, tmp / f"spec{idx}.json", tmp / f"out{idx}.json", f"bench: the worker measuring {label}",
                        omp_threads=spec.threads if spec.kind == "torch" else None)
    if not res.ok:
        if os.environ.get("EDGECLI_DEBUG"):
            print(res.traceback or "", file=sys.stderr)
        if res.config_error:  # the worker's runtime is installed but does not import: the error names the extra
            raise ConfigError(res.error)
        if res.user_error:
            raise ModelFileError(f"bench: {label}: {res.error}")
        raise CheckFailed(f"bench: measuring {label} failed: {res.error}")
    return res


def _where_ran(t: Target, prov: str) -> str:
    """The provider column: the ORT provider, or the runtime and precision of a runtime target."""
    return f"{t.runtime['runtime']} {t.runtime['precision']}" if t.runtime else short_provider(prov)


def short_provider(p: str) -> str:
    return p[: -len("ExecutionProvider")] if p.endswith("ExecutionProvider") else p


def _jobs(cfg: PipelineConfig, targets: list[Target], providers: list[str], xs: dict, y_path: str | None,
          num_classes: int, notes: list[str]) -> list[tuple[Target, str, int, WorkerSpec]]:
    """(target, provider, threads, spec) of every measurement, in table order."""
    bc = cfg.bench
    jobs = []
    for t in targets:
        for prov in (["CPUExecutionProvider"] if t.kind in ("torch", "runtime") else providers):
            for threads in bc.threads:
                if t.kind == "torch" and xs.get(t.label) is None:
                    notes.append("PyTorch baseline skipped: the test split is not a numeric array")
                    continue
                rt = t.runtime or {}
                spec = WorkerSpec(
                    kind=t.kind, model=str(t.path), weights=str(t.path), model_info=t.info, providers=[prov],
                    threads=threads, batch_sizes=list(bc.batch_sizes), warmup=bc.warmup, runs=bc.runs,
                    min_time_s=bc.min_time_s, x=xs.get(t.label), y=y_path, accuracy_samples=bc.accuracy_samples,
                    num_classes=(t.info or {}).get("num_classes") or num_classes, backend=rt.get("runtime"),
                    precision=rt.get("precision"), input_names=rt.get("input_names"), embedder=rt.get("embedder"))
                jobs.append((t, prov, threads, spec))
    return jobs


def _record(t: Target, prov: str, threads: int, res: WorkerResult, processes: int, notes: list[str]
            ) -> tuple[dict, list[dict]]:
    """(the measurement, its rows: one per timed batch size) of one merged worker result."""
    if t.kind == "onnx" and prov not in res.providers_used:
        notes.append(f"{t.label}: {short_provider(prov)} did not take the model; it ran on "
                     f"{', '.join(short_provider(p) for p in res.providers_used)}")
    if res.accuracy_note:
        notes.append(f"{t.label}: timed on synthetic inputs, accuracy not measured ({res.accuracy_note})")
    acc = (res.metrics or {}).get("accuracy")
    m = {
        "model": t.label, "kind": t.kind, "provider": _where_ran(t, prov), "threads": threads,
        "providers_used": res.providers_used, "processes": processes, "import_ms": res.import_ms,
        "load_ms": res.load_ms, "first_inference_ms": res.first_ms,
        "cold_start_ms": (res.load_ms + res.first_ms) if res.first_ms is not None else None,
        "peak_memory_mb": res.peak_rss_kb / 1024, "rss_before_load_mb": res.rss_before_load_kb / 1024,
        "peak_memory_with_accuracy_mb": res.peak_rss_with_accuracy_kb / 1024,
        "torch_imported": res.torch_imported, "synthetic_inputs": res.synthetic_inputs,
        "accuracy_note": res.accuracy_note, "metrics": res.metrics,
    }
    rows = []
    for b in res.batches:
        if b.skipped is not None:
            notes.append(f"{t.label}: batch {b.batch} skipped ({b.skipped})")
            continue
        rows.append({
            "model": t.label, "kind": t.kind, "stage": t.stage, "path": str(t.path),
            "provider": _where_ran(t, prov), "batch": b.batch, "threads": threads,
            "size_bytes": t.size_bytes, "accuracy": acc, **latency_stats(b.latencies_ns, b.batch),
            "p50_per_process_ms": b.p50_per_process_ms, "p95_per_process_ms": b.p95_per_process_ms,
            "peak_memory_mb": m["peak_memory_mb"], "cold_start_ms": m["cold_start_ms"],
            "latencies_ns": b.latencies_ns, **({"sequence": b.sequence} if b.sequence is not None else {}),
        })
        if b.sequence is not None and not any("sequence length" in n for n in notes):
            notes.append(f"text models timed on test sentences at batch size b, padded to the "
                         f"longest of those b (sequence length {b.sequence} at batch {b.batch})")
    return m, rows


def _profiles(cfg: PipelineConfig, jobs: list, tmp: Path, out_dir: Path, quiet: bool) -> list[dict]:
    """bench --profile: after the timed workers, one short profile worker per model and provider at the first
    thread count and smallest batch (edgecli.runtimes.profile); its files go to ``out_dir``. A runtime without
    a profiler, or a profile run that fails, is a record with ``unavailable`` (the timed figures stand)."""
    from edgecli.report import info
    from edgecli.runtimes.profile import counts, file_stem, unavailable

    bc = cfg.bench
    runs, warmup = counts(bc.runs, bc.warmup)
    many = len({prov for t, prov, _, _ in jobs if t.kind == "onnx"}) > 1
    out: list[dict] = []
    taken: set[str] = set()
    for t, prov, threads, spec in jobs:
        if t.kind == "torch" or threads != bc.threads[0]:
            continue
        rt = t.runtime or {}
        rec = {"model": t.label, "provider": _where_ran(t, prov), "runtime": rt.get("runtime", "onnxruntime"),
               "precision": rt.get("precision")}
        why = unavailable(rec["runtime"])
        if why:
            out.append({**rec, "unavailable": why})
            continue
        stem = file_stem(out_dir, t.label, short_provider(prov) if many and t.kind == "onnx" else None, taken)
        pspec = spec.model_copy(update={"profile": str(stem), "batch_sizes": [min(spec.batch_sizes)], "runs": runs,
                                        "warmup": warmup, "min_time_s": None, "y": None})
        if not quiet:
            info(f"bench: profiling {t.label} on {rec['provider']} ({runs} runs)")
        idx = len(list(tmp.glob("pspec*.json")))
        try:
            res = launch_worker(pspec, tmp / f"pspec{idx}.json", tmp / f"pout{idx}.json",
                                f"bench: the worker profiling {t.label}", omp_threads=threads)
            why = None if res.ok and res.profile else res.error
        except CheckFailed as e:  # the worker died (a crash, a signal): it may have written part of a file
            why = e.message
        if why is not None:
            for f in out_dir.glob(stem.name + ".*"):  # nothing half-written is published
                f.unlink()
            out.append({**rec, "unavailable": f"profiling failed: {why}"})
            continue
        out.append({**rec, **{k: v for k, v in res.profile.items() if v is not None}})
    return out


def measure(cfg: PipelineConfig, targets: list[Target], providers: list[str], quiet: bool,
            profile_dir: Path | None = None) -> tuple[list[dict], list[dict], list[str], list[dict]]:
    """(rows, measurements, notes, profiles): ``bench.repeats`` fresh workers per model x provider x thread count;
    then, with ``profile_dir``, one profile worker per model and provider (``_profiles``; else no profiles).

    The repeats run in interleaved order (every model once, then every model again...), so drift in
    machine load hits all models alike, and per-process effects (which core, memory placement:
    30-50% on sub-millisecond models here) average out instead of deciding a comparison.
    """
    from edgecli.report import info
    from edgecli.safeio import temp_dir

    bc = cfg.bench
    rows: list[dict] = []
    measurements: list[dict] = []
    with temp_dir("bench") as td:  # named by pid: the next run removes it should this one be SIGKILLed
        tmp = Path(td)
        xs, y_path, num_classes, notes = _write_inputs(cfg, targets, tmp)
        jobs = _jobs(cfg, targets, providers, xs, y_path, num_classes, notes)
        results: list[list[WorkerResult]] = [[] for _ in jobs]
        for rep in range(bc.repeats):
            for j, (t, prov, threads, spec) in enumerate(jobs):
                if not quiet:
                    of = f" [process {rep + 1}/{bc.repeats}]" if bc.repeats > 1 else ""
                    info(f"bench: {t.label} on {short_provider(prov)}, {threads} thread(s){of}")
                # only the first process scores accuracy: the others would repeat the same numbers
                results[j].append(run_worker(spec if rep == 0 else spec.model_copy(update={"y": None}), tmp, t.label))
        if bc.repeats > 1:
            notes.append(f"latencies pooled over {bc.repeats} fresh processes per model, run in interleaved order "
                         "(results.json keeps each process's p50 and p95)")
        for (t, prov, threads, _), runs in zip(jobs, results, strict=True):
            m, mrows = _record(t, prov, threads, merge_repeats(runs), len(runs), notes)
            measurements.append(m)
            rows += mrows
        profiles = _profiles(cfg, jobs, tmp, profile_dir, quiet) if profile_dir is not None else []
    base = {(r["batch"], r["threads"]): r["p50_ms"] for r in rows if r["kind"] == "torch"}
    for r in rows:
        ref = base.get((r["batch"], r["threads"]))
        r["speedup_vs_pytorch"] = ref / r["p50_ms"] if ref and r["p50_ms"] > 0 else None
    return rows, measurements, notes, profiles
