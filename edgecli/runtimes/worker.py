"""The bench worker for any runtime of the runtime layer (``"kind": "runtime"`` in the worker spec).

Same protocol and timer as edgecli/benchworker.py's ONNX measurement (its ``_time_loop``, inputs,
memory and metrics are reused, not rewritten): import, cold start, warm-up then timed runs around
``session.run`` alone, peak memory, then accuracy over the test split through that runtime.
``spawn`` starts one such worker in a fresh process, as the bench stage does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def measure_runtime(spec: dict) -> dict:
    from edgecli import benchworker as bw

    t0 = time.perf_counter()
    from edgecli import runtimes

    backend = runtimes.require(spec["backend"])
    import_ms = (time.perf_counter() - t0) * 1e3
    x, y = bw._load_inputs(spec)
    rss_before = bw._rss_kb()
    t0 = time.perf_counter()
    sess = backend.open(spec["model"], threads=int(spec["threads"]), precision=spec.get("precision"))
    load_ms = (time.perf_counter() - t0) * 1e3
    names = list(spec.get("input_names") or [i.name for i in sess.inputs])

    def feed_for(rows, b: int) -> dict:
        if isinstance(rows, dict):
            feed = {k: np.ascontiguousarray(np.resize(np.asarray(rows[k][:b]), (b, *rows[k].shape[1:])))
                    for k in names if k in rows}
            return bw._trim(feed)
        xb = np.asarray(rows[:b], dtype=np.float32)
        return {names[0]: np.ascontiguousarray(np.resize(xb, (b, *xb.shape[1:])))}

    first_ms, batches = None, []
    for b in spec["batch_sizes"]:
        feed = feed_for(x, b)
        if first_ms is None:
            t0 = time.perf_counter()
            sess.run(feed)
            first_ms = (time.perf_counter() - t0) * 1e3
        lat = bw._time_loop(lambda feed=feed: sess.run(feed), spec["warmup"], spec["runs"], spec.get("min_time_s"))
        batches.append({"batch": b, "latencies_ns": lat, **bw._seq_note(feed)})
    peak = bw._peak_rss_kb()
    metrics, note = None, None
    embedder = spec.get("embedder") or (sess.outputs and sess.outputs[0].name == "embedding")
    if embedder:
        note = "an embedding model: no class scores to measure accuracy on (export reports its cosine)"
    elif y is not None:
        n = spec.get("accuracy_samples") or len(y)
        step = 64
        logits = np.concatenate([np.asarray(sess.run(feed_for(_rows(x, i, i + step), min(step, n - i)))[0])
                                 for i in range(0, n, step)])
        metrics = bw._metrics(logits, np.asarray(y[:n]), spec.get("num_classes"))
    return {
        "providers_used": [f"{backend.name}"], "runtime": backend.name, "runtime_version": backend.version(),
        "precision": getattr(sess, "precision", spec.get("precision")),
        "ran_precision": getattr(sess, "ran_precision", None),
        "input": {"name": names[0], "shape": [d if isinstance(d, int) else str(d) for d in sess.inputs[0].shape],
                  "type": str(sess.inputs[0].dtype)},
        "synthetic_inputs": False, "accuracy_note": note,
        "import_ms": import_ms, "load_ms": load_ms, "first_ms": first_ms,
        "rss_before_load_kb": rss_before, "peak_rss_kb": peak, "peak_rss_with_accuracy_kb": bw._peak_rss_kb(),
        "batches": batches, "metrics": metrics,
    }


def _rows(x, i: int, j: int):
    return {k: v[i:j] for k, v in x.items()} if isinstance(x, dict) else x[i:j]


def write_inputs(feeds: dict[str, np.ndarray], tmp: Path, tag: str) -> str:
    """The timing/accuracy inputs as the worker reads them: one .npy, or an .npz for several inputs."""
    if len(feeds) == 1 and not any(v.dtype.kind in "iu" for v in feeds.values()):
        p = tmp / f"{tag}.npy"
        np.save(p, next(iter(feeds.values())))
    else:
        p = tmp / f"{tag}.npz"
        np.savez(p, **feeds)
    return str(p)


def launch(spec: dict, sp: Path, op: Path, what: str, *, omp_threads: int | None = None) -> dict:
    """Run ``python -m edgecli.benchworker`` on ``spec`` (written to ``sp``) in a fresh process that dies
    with this one; the result dict it wrote to ``op``, ok or not. CheckFailed naming ``what`` if it died."""
    from edgecli.errors import CheckFailed

    sp.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["EDGECLI_PARENT_PID"] = str(os.getpid())  # the worker dies with this process (benchworker.die_with_parent)
    if omp_threads is not None:  # no OpenMP pool wider than the thread count being measured
        env["OMP_NUM_THREADS"] = str(omp_threads)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "edgecli.benchworker", str(sp), str(op)],
                          capture_output=True, text=True, env=env)
    if not op.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise CheckFailed(f"{what} died (exit code {proc.returncode}): {last}")
    return json.loads(op.read_text())


def spawn(spec: dict, tmp: Path, label: str) -> dict:
    """One measurement in a fresh ``python -m edgecli.benchworker`` process; its result dict."""
    from edgecli.errors import CheckFailed

    idx = len(list(tmp.glob("rspec*.json")))
    # ExecuTorch imports torch: no pool wider than asked
    res = launch(spec, tmp / f"rspec{idx}.json", tmp / f"rout{idx}.json", f"the worker measuring {label}",
                 omp_threads=spec["threads"])
    if not res.get("ok"):
        if os.environ.get("EDGECLI_DEBUG"):
            print(res.get("traceback", ""), file=sys.stderr)
        raise CheckFailed(f"measuring {label} failed: {res['error']}")
    return res
