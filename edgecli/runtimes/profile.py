"""Where the time goes: a per-operator profile of one model, from its runtime's own profiler.

``bench --profile`` (``bench.profile: true``) runs one short extra worker per ONNX model and
runtime row after the timed workers, so profiling never touches the timed figures. The worker
(``python -m edgecli.benchworker`` with ``WorkerSpec.profile`` set) calls :func:`run`, which opens the
model with the runtime's profiler on, runs ``warmup`` + ``runs`` inferences at the smallest benched
batch size, writes the runtime's own profile file and returns the operators aggregated by op type:

- ONNX Runtime: ``SessionOptions.enable_profiling`` -> ``end_profiling()``: a chrome-trace JSON
  (open it in chrome://tracing or https://ui.perfetto.dev); the ``Node`` ``*_kernel_time`` events,
  grouped by ``args.op_name``;
- ExecuTorch: the program loaded with ``enable_etdump=True`` -> ``write_etdump_result_to_file``: an
  ETDump (``.etdp``), read back with ``executorch.devtools.Inspector``; the XNNPACK delegate reports
  each of its kernels ("Convolution (NHWC, F32) IGEMM #2"), grouped without the ``#n``;
- OpenVINO: compiled with ``PERF_COUNT`` -> ``request.get_profiling_info()`` after every run: the
  executed nodes' ``real_time``, grouped by ``node_type``, every record kept in a JSON file;
- LiteRT: its Python ``Interpreter`` has no op profiler, so the row says so (:func:`unavailable`).

Warm-up runs are profiled by ONNX Runtime and ExecuTorch too but left out of the figures. A share
is an op type's part of the summed operator time, so the shares of every op type add up to 100%.
All three profilers time each kernel call in whole microseconds (ORT's trace ``dur``, XNNPACK's
operator timings, OpenVINO's ``real_time``): on a tiny model a kernel under 1 us reads 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

TOP = 8  # op types per printed table; the rest are one "other" row
LITERT_REASON = ("not available: ai_edge_litert's Python Interpreter has no op profiler "
                 "(LiteRT profiles ops in its C++ benchmark_model tool, --enable_op_profiling=true)")


def unavailable(runtime: str) -> str | None:
    """None when ``runtime`` has a profiler edgecli reads; else the one-line reason (no worker needed)."""
    if runtime in ("onnxruntime", "executorch", "openvino"):
        return None
    if runtime == "litert":
        return LITERT_REASON
    return f"not available: edgecli reads no profiler of the {runtime} runtime"


def file_stem(out_dir: Path, label: str, provider: str | None, taken: set[str]) -> Path:
    """``<out_dir>/profile-<label>[-<provider>]``, unique among ``taken`` (the worker adds the suffix)."""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", label + (f" {provider}" if provider else "")).strip("-.")[:80] or "model"
    name, i = f"profile-{slug}", 2
    while name in taken:
        name, i = f"profile-{slug}-{i}", i + 1
    taken.add(name)
    return out_dir / name


# --------------------------------------------------------------------------- worker side


def run(spec) -> dict:
    """The WorkerResult fields of one profile run (``spec``: a WorkerSpec read as attributes)."""
    runtime = spec.backend if spec.kind == "runtime" else "onnxruntime"
    stem = Path(spec.profile)
    # the parent launches a profile worker only for these (measure._profiles asks unavailable() first)
    fn = {"onnxruntime": _onnxruntime, "executorch": _executorch, "openvino": _openvino}[runtime]
    prof, used = fn(spec, stem)
    prof.setdefault("runtime", runtime)
    prof.update(batch=min(spec.batch_sizes), threads=int(spec.threads))
    return {"profile": prof, "providers_used": used}


def summary(ops: dict[str, list[float]], path: Path, runs: int, group: str) -> dict:
    """``ops``: op -> [total ms, calls] over the profiled runs; shares of the summed operator time.
    ``file``: the profile file's name, in the bench stage's directory (it is written before publishing)."""
    total = sum(v[0] for v in ops.values())
    rows = sorted(ops.items(), key=lambda kv: -kv[1][0])
    return {"file": path.name, "runs": runs, "group": group, "op_ms": total,
            "op_ms_per_run": total / runs if runs else None,
            "ops": [{"op": k, "total_ms": v[0], "calls": int(v[1]), "share": v[0] / total if total > 0 else 0.0}
                    for k, v in rows]}


def _rows(x, b: int):
    """The first ``b`` rows of the test split (repeated when it has fewer), or None."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: np.ascontiguousarray(np.resize(np.asarray(v[:b]), (b, *v.shape[1:]))) for k, v in x.items()}
    return np.ascontiguousarray(np.resize(np.asarray(x[:b]), (b, *x.shape[1:])))


def _feed(spec, inputs: list[tuple[str, tuple, np.dtype]], names: list[str] | None = None) -> dict:
    """The feed at the smallest benched batch: test rows where they fit the inputs, else synthetic ones.

    ``inputs``: (name, shape, dtype) of the file; ``names``: the card's input names to key the rows by."""
    from edgecli.runtimes.feeds import load_worker_inputs, synthetic_input, trim_to_longest

    b = min(spec.batch_sizes)
    fixed = inputs[0][1][0] if inputs and inputs[0][1] and isinstance(inputs[0][1][0], int) else None
    b = fixed if fixed and fixed > 0 and spec.kind == "onnx" else b
    keys = names or [n for n, _, _ in inputs]
    x = _rows(load_worker_inputs(spec)[0], b)
    if isinstance(x, dict) and all(k in x for k in keys[: len(inputs)]):
        return trim_to_longest({k: np.asarray(x[k], dtype=dt) for k, (_, _, dt) in zip(keys, inputs, strict=False)})
    if isinstance(x, np.ndarray) and len(inputs) == 1 and x.ndim == len(inputs[0][1]) and all(
            not isinstance(w, int) or w == g for w, g in zip(inputs[0][1][1:], x.shape[1:], strict=True)):
        return {keys[0]: np.asarray(x, dtype=inputs[0][2])}
    rng = np.random.default_rng(0)
    return {n: synthetic_input(s, dt, batch=b, rng=rng) for n, s, dt in inputs}


def _loop(call, spec) -> None:
    for _ in range(int(spec.warmup) + int(spec.runs)):
        call()


def _onnxruntime(spec, stem: Path) -> tuple[dict, list[str]]:
    from edgecli.runtimes.ort import ORT_DTYPES, make_session

    sess = make_session(spec.model, threads=spec.threads, providers=spec.providers, profile_prefix=str(stem))
    inputs = [(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.dtype(np.float32))) for i in sess.get_inputs()]
    feed = _feed(spec, inputs)
    _loop(lambda: sess.run(None, feed), spec)
    written = Path(sess.end_profiling())
    path = stem.with_suffix(".json")
    written.replace(path)
    events = json.loads(path.read_text())
    ops, runs = ort_ops(events, int(spec.warmup))
    prof = summary(ops, path, runs, "op type")
    prof["version"] = __import__("onnxruntime").__version__
    return prof, sess.get_providers()


def ort_ops(events: list[dict], warmup: int) -> tuple[dict[str, list[float]], int]:
    """(op type -> [ms, calls], runs) from ONNX Runtime's chrome trace, the first ``warmup`` runs left out."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    cutoff = runs[warmup - 1]["ts"] + runs[warmup - 1]["dur"] if 0 < warmup <= len(runs) else float("-inf")
    ops: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e["ts"] >= cutoff:
            op = (e.get("args") or {}).get("op_name") or e["name"][: -len("_kernel_time")]
            acc = ops.setdefault(op, [0.0, 0])
            acc[0] += e["dur"] / 1e3  # microseconds
            acc[1] += 1
    return ops, max(0, len(runs) - warmup)


def _runtime_session(spec, **kw):
    from edgecli import runtimes

    backend = runtimes.require(spec.backend)
    sess = backend.open(spec.model, threads=int(spec.threads), precision=spec.precision, **kw)
    inputs = [(i.name, tuple(i.shape), np.dtype(i.dtype)) for i in sess.inputs]
    return backend, sess, _feed(spec, inputs, list(spec.input_names or []) or None)


def _executorch(spec, stem: Path) -> tuple[dict, list[str]]:
    backend, sess, feed = _runtime_session(spec, etdump=True)
    _loop(lambda: sess.run(feed), spec)
    path, debug = stem.with_suffix(".etdp"), stem.with_suffix(".debug.bin")
    why = None
    try:
        sess.program.write_etdump_result_to_file(str(path), str(debug))
    except Exception as e:  # noqa: BLE001 - a runtime built without the event tracer refuses here
        why = f"write_etdump_result_to_file failed ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})"
    debug.unlink(missing_ok=True)
    base = {"runtime": "executorch", "version": backend.version(), "precision": sess.precision}
    if why is None and (not path.is_file() or path.stat().st_size == 0):
        why = "it wrote no ETDump"
    if why is None:
        ops, runs = etdump_ops(path, int(spec.warmup), int(spec.warmup) + int(spec.runs))
        if ops:
            return {**base, **summary(ops, path, runs, "XNNPACK kernel / op")}, [backend.name]
        why = "the ETDump holds no operator events (ExecuTorch built without EXECUTORCH_ENABLE_EVENT_TRACER)"
    path.unlink(missing_ok=True)
    return {**base, "unavailable": f"not available in this executorch build: {why}"}, [backend.name]


def etdump_ops(path: Path, warmup: int, calls: int) -> tuple[dict[str, list[float]], int]:
    """(op -> [ms, calls], runs) from an ETDump through ``executorch.devtools.Inspector``.

    The "Execute" blocks' leaf events: a delegate's own kernels when it reports them (then its
    DELEGATE_CALL, which contains them, is left out), the portable kernels' events otherwise."""
    import contextlib
    import sys
    import warnings

    from executorch.devtools import Inspector

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # "Output Buffer not found": no debug buffer was asked for
        inspector = Inspector(etdump_path=str(path))
    events = [ev for blk in inspector.event_blocks if blk.name == "Execute" for ev in blk.events
              if ev.perf_data is not None and ev.name not in ("Method::execute",)]
    executes = [ev for blk in inspector.event_blocks if blk.name == "Execute" for ev in blk.events
                if ev.name == "Method::execute" and ev.perf_data is not None]
    n_exec = len(executes[0].perf_data.raw) if executes else calls
    per_call = max(1, n_exec // calls) if calls else 1  # a batch > the file's batch runs row by row
    delegated = any(ev.is_delegated_op for ev in events)
    ops: dict[str, list[float]] = {}
    for ev in events:
        if delegated and ev.name == "DELEGATE_CALL":
            continue
        raw = list(ev.perf_data.raw)[warmup * per_call:]
        acc = ops.setdefault(re.sub(r"\s*#\d+$", "", ev.name), [0.0, 0])
        acc[0] += float(sum(raw))  # Inspector's default target time scale: ms
        acc[1] += len(raw)
    return ops, max(0, calls - warmup)


def _openvino(spec, stem: Path) -> tuple[dict, list[str]]:
    backend, sess, feed = _runtime_session(spec, perf_count=True)
    for _ in range(int(spec.warmup)):
        sess.run(feed)
    records, ops = [], {}
    for r in range(int(spec.runs)):
        sess.run(feed)
        for p in sess.request.get_profiling_info():
            ms = p.real_time.total_seconds() * 1e3
            records.append({"run": r, "node_name": p.node_name, "node_type": p.node_type, "exec_type": p.exec_type,
                            "real_time_ms": ms, "cpu_time_ms": p.cpu_time.total_seconds() * 1e3,
                            "status": str(p.status).rsplit(".", 1)[-1]})
            if records[-1]["status"] == "EXECUTED":
                acc = ops.setdefault(p.node_type, [0.0, 0])
                acc[0] += ms
                acc[1] += 1
    path = stem.with_suffix(".json")
    path.write_text(json.dumps({"runtime": "openvino", "version": backend.version(), "source": "get_profiling_info",
                                "precision": sess.precision, "ran_precision": sess.ran_precision,
                                "runs": int(spec.runs), "records": records}))
    prof = {"runtime": "openvino", "version": backend.version(), "precision": sess.precision,
            "ran_precision": sess.ran_precision, **summary(ops, path, int(spec.runs), "node type")}
    return prof, [backend.name]


# --------------------------------------------------------------------------- parent side


def tables(profiles: list[dict], top: int = TOP) -> tuple[list[tuple[str, list[str], list[list[str]]]], list[str]]:
    """(title, columns, rows) per profiled model, and one line for each model that has no profile."""
    out, lines = [], []
    for p in profiles:
        where = p["runtime"]  # a runtime row's label names its target and precision already
        if p.get("unavailable"):
            lines.append(f"{p['model']} ({where}): profile: {p['unavailable']}")
            continue
        ops, runs = p["ops"], max(1, int(p["runs"]))
        rows = [_row(o["op"], [o], runs) for o in ops[:top]]
        if len(ops) > top:
            rows.append(_row(f"({len(ops) - top} other)", ops[top:], runs))
        title = f"profile: {p['model']} · {where} · {p['runs']} runs"
        out.append((title, [p.get("group", "op type"), "share", "total ms", "ms/run", "calls"], rows))
    done = [p for p in profiles if p.get("file") and not p.get("unavailable")]
    if done:
        lines.append(f"profiles from the runtimes' own profilers (batch {done[0]['batch']}, {done[0]['threads']} "
                     f"thread(s); each kernel call timed in whole microseconds, so one under 1 us reads 0): "
                     f"{', '.join(p['file'] for p in done)}")
    return out, lines


def _row(name: str, group: list[dict], runs: int) -> list[str]:
    """One table row: an op type (or the rest of them) with its share, total ms, ms per run and calls."""
    ms = sum(o["total_ms"] for o in group)
    return [name, f"{sum(o['share'] for o in group):.1%}", f"{ms:.3f}", f"{ms / runs:.4f}",
            str(sum(o["calls"] for o in group))]


def counts(runs: int, warmup: int) -> tuple[int, int]:
    """(runs, warmup) of a profile run: short whatever bench.runs says (the shares settle within 100 runs)."""
    return max(1, min(int(runs), 100)), min(int(warmup), 10)

