"""The bench-worker contract: ``WorkerSpec`` in, ``WorkerResult`` out, as JSON files, one process each.

Every place that times a model with bench's protocol (the bench stage, compress's latency
confirmation, export's runtime choice) writes a ``WorkerSpec`` and starts
``python -m edgecli.benchworker SPEC.json OUT.json`` (``run_worker``); the worker measures and writes
a ``WorkerResult``, which is validated here on the way back. The worker itself (edgecli/benchworker.py)
reads the spec as plain JSON and builds its ``WorkerResult`` only after its memory figures are taken:
importing pydantic costs a worker 11 MB of resident memory, which would otherwise show up in every
model's peak memory.

``latency_stats`` and ``merge_repeats`` pool what several workers measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict


class WorkerSpec(BaseModel):
    """One measurement: a model (ONNX file, runtime-layer file or PyTorch weights), one provider, one thread count."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["onnx", "torch", "runtime"]
    model: str | None = None  # the ONNX / runtime file
    weights: str | None = None  # kind "torch": the safetensors file, built from model_info
    model_info: dict | None = None
    providers: list[str] = ["CPUExecutionProvider"]
    threads: int = 1
    batch_sizes: list[int] = [1]
    warmup: int = 0
    runs: int = 1
    min_time_s: float | None = None  # timed runs go on until both runs and this are reached
    x: str | None = None  # .npy (one input) or .npz (one array per input) of timing/accuracy rows
    y: str | None = None  # .npy labels: accuracy is measured when set
    accuracy_samples: int | None = None
    num_classes: int | None = None
    backend: str | None = None  # kind "runtime": the runtime-layer backend, its precision, input names
    precision: str | None = None
    input_names: list[str] | None = None
    embedder: bool | None = None
    profile: str | None = None  # set: a profile run instead (edgecli.runtimes.profile), files at this path + suffix


class BatchTiming(BaseModel):
    """The timed runs at one batch size (or why it was skipped)."""

    model_config = ConfigDict(extra="forbid")

    batch: int
    latencies_ns: list[int] = []
    skipped: str | None = None
    sequence: int | None = None  # text: the length the batch was trimmed to
    p50_per_process_ms: list[float] | None = None  # set by merge_repeats
    p95_per_process_ms: list[float] | None = None


class WorkerResult(BaseModel):
    """What one worker measured (see edgecli/benchworker.py for the order), or why it could not."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    error: str | None = None
    user_error: bool = False  # an EdgeError (the model file's fault), not a crash
    config_error: bool = False  # a ConfigError (a runtime installed but not importing): the parent says so, exit 2
    traceback: str | None = None
    providers_used: list[str] = []
    input: dict | None = None
    synthetic_inputs: bool = False
    accuracy_note: str | None = None
    import_ms: float | None = None
    load_ms: float | None = None
    first_ms: float | None = None
    rss_before_load_kb: int = 0
    peak_rss_kb: int = 0
    peak_rss_with_accuracy_kb: int = 0
    batches: list[BatchTiming] = []
    metrics: dict | None = None
    torch_threads: int | None = None
    runtime: str | None = None
    runtime_version: str | None = None
    precision: str | None = None
    ran_precision: str | None = None
    torch_imported: bool = False
    pid: int | None = None
    profile: dict | None = None  # a profile run's operators (edgecli.runtimes.profile.summary)


def run_worker(spec: WorkerSpec, sp: Path, op: Path, what: str, *, omp_threads: int | None = None) -> WorkerResult:
    """Run ``python -m edgecli.benchworker`` on ``spec`` (written to ``sp``) in a fresh process that dies
    with this one; the result it wrote to ``op``, ok or not. CheckFailed naming ``what`` if it died."""
    from edgecli.errors import CheckFailed

    sp.write_text(spec.model_dump_json())
    env = dict(os.environ)
    env["EDGECLI_PARENT_PID"] = str(os.getpid())  # the worker dies with this process (benchworker.die_with_parent)
    if omp_threads is not None:  # no OpenMP pool wider than the thread count being measured
        env["OMP_NUM_THREADS"] = str(omp_threads)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "edgecli.benchworker", str(sp), str(op)],
                          capture_output=True, text=True, errors="replace", env=env)
    if not op.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise CheckFailed(f"{what} died (exit code {proc.returncode}): {last}")
    return WorkerResult.model_validate(json.loads(op.read_text()))  # json: NaN metrics stay NaN, as written


def launch(spec: dict | WorkerSpec, sp: Path, op: Path, what: str, *, omp_threads: int | None = None) -> dict:
    """``run_worker`` for callers that hold the spec and read the result as dicts (the same JSON)."""
    ws = spec if isinstance(spec, WorkerSpec) else WorkerSpec.model_validate(spec)
    return run_worker(ws, sp, op, what, omp_threads=omp_threads).model_dump()


def spawn(spec: dict, tmp: Path, label: str) -> dict:
    """One measurement in a fresh ``python -m edgecli.benchworker`` process; its result dict."""
    from edgecli.errors import CheckFailed

    idx = len(list(tmp.glob("rspec*.json")))
    # ExecuTorch imports torch: no pool wider than asked
    res = launch(spec, tmp / f"rspec{idx}.json", tmp / f"rout{idx}.json", f"the worker measuring {label}",
                 omp_threads=spec["threads"])
    if not res.get("ok"):
        if os.environ.get("EDGECLI_DEBUG"):
            print(res.get("traceback") or "", file=sys.stderr)
        raise CheckFailed(f"measuring {label} failed: {res['error']}")
    return res


def write_inputs(feeds: dict[str, np.ndarray], tmp: Path, tag: str) -> str:
    """The timing/accuracy inputs as the worker reads them: one .npy, or an .npz for several inputs."""
    if len(feeds) == 1 and not any(v.dtype.kind in "iu" for v in feeds.values()):
        p = tmp / f"{tag}.npy"
        np.save(p, next(iter(feeds.values())))
    else:
        p = tmp / f"{tag}.npz"
        np.savez(p, **feeds)
    return str(p)


# --------------------------------------------------------------------------- pooling workers' results


def latency_stats(lat_ns: list[int], batch: int) -> dict:
    """Percentiles in ms of the timed runs; throughput = samples over the summed run time."""
    a = np.asarray(lat_ns, dtype=np.float64) / 1e6
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
        "mean_ms": float(a.mean()), "std_ms": float(a.std()), "min_ms": float(a.min()), "max_ms": float(a.max()),
        "runs": int(len(a)), "throughput_sps": float(batch * len(a) / (a.sum() / 1e3)) if a.sum() > 0 else None,
    }


def merge_repeats(runs: list[WorkerResult]) -> WorkerResult:
    """One worker result from ``bench.repeats`` fresh-process results of the same measurement.

    Timed runs are pooled (results.json keeps every one, and each process's p50 and p95); cold-start and
    import times are the median process's; peak memory is the largest (budgets stay conservative);
    accuracy comes from the first process, the only one that scores (the model is deterministic).
    """
    first = runs[0]
    upd: dict = {}
    for k in ("import_ms", "load_ms", "first_ms"):
        vals = [getattr(r, k) for r in runs if getattr(r, k) is not None]
        upd[k] = float(np.median(vals)) if vals else None
    for k in ("peak_rss_kb", "rss_before_load_kb"):
        upd[k] = max(getattr(r, k) for r in runs)
    batches = []
    for i, b in enumerate(first.batches):
        if b.skipped is not None:
            batches.append(b)
            continue
        per = [r.batches[i].latencies_ns for r in runs]
        batches.append(b.model_copy(update={
            "latencies_ns": [x for lat in per for x in lat],
            "p50_per_process_ms": [float(np.percentile(lat, 50)) / 1e6 for lat in per],
            "p95_per_process_ms": [float(np.percentile(lat, 95)) / 1e6 for lat in per]}))
    upd["batches"] = batches
    return first.model_copy(update=upd)
