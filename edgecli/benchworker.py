"""The bench measurement worker: one model, one provider, one thread count, in a fresh process.

``python -m edgecli.benchworker SPEC.json OUT.json``. The parent (edgecli.stages.bench) starts one
worker per measurement so that memory figures are this model's alone and no model warms caches or
thread pools for the next. ONNX workers never import torch (the result records whether it was);
the PyTorch eager baseline worker does.

Order inside the worker, and what each figure covers:

1. import the runtime (``import_ms``), read the timing inputs (the first rows of the test split);
2. cold start: session creation / model build + weights (``load_ms``), first inference (``first_ms``);
3. per batch size: ``warmup`` untimed runs, then timed runs, ``time.perf_counter_ns`` around the
   run call only, until ``runs`` runs are done and (when set) ``min_time_s`` has passed;
4. ``peak_rss_kb``: the process's peak resident memory (VmHWM, see ``_peak_rss_kb``) at this point: imports,
   model, and inference at every benched batch size, but not the accuracy pass;
5. accuracy and the other classification metrics over the test split.

A spec with ``profile`` set is a profile run instead (``bench --profile``, after the timed workers):
edgecli.runtimes.profile opens the model with its runtime's own profiler on and writes its file.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgecli.runtimes.feeds import load_worker_inputs as _load_inputs
from edgecli.runtimes.feeds import trim_to_longest as _trim
from edgecli.runtimes.ort import ORT_DTYPES

# timed runs stop here even if min_time_s has not passed: results.json keeps every latency
MAX_RUNS = 200_000



def _rss_kb() -> int:
    """Current resident memory in KB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_kb() -> int:
    """This process's peak resident memory in KB.

    VmHWM first: Linux carries ``ru_maxrss`` across fork+exec, so a worker started by a 150 MB
    parent would report at least 150 MB whatever it loads; VmHWM belongs to the worker's own
    address space. ``ru_maxrss`` where /proc is absent (macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)  # macOS reports bytes


def _time_loop(call, warmup: int, runs: int, min_time_s: float | None) -> list[int]:
    """Latencies in ns of ``call()``: the clock brackets the call and nothing else."""
    for _ in range(warmup):
        call()
    pc = time.perf_counter_ns
    min_ns = int(min_time_s * 1e9) if min_time_s else 0
    lat: list[int] = []
    start = pc()
    while True:
        t0 = pc()
        call()
        t1 = pc()
        lat.append(t1 - t0)
        if len(lat) >= runs and (t1 - start) >= min_ns:
            break
        if len(lat) >= MAX_RUNS:
            break
    return lat


def _dict_batch(x: dict, inputs, b: int) -> dict[str, np.ndarray]:
    feed = {}
    for i in inputs:
        a = np.asarray(x[i.name][:b], dtype=ORT_DTYPES.get(i.type, np.int64))
        if len(a) < b:  # fewer test samples than the batch: repeat them
            a = np.resize(a, (b, *a.shape[1:]))
        feed[i.name] = np.ascontiguousarray(a)
    return _trim(feed)


# --------------------------------------------------------------------------- ONNX Runtime


def _fit_note(inputs, x) -> str | None:
    """None when the test split fits the model's single input; else why it does not."""
    if x is None:
        return "no test split available for this model's inputs"
    if isinstance(x, dict):
        missing = [i.name for i in inputs if i.name not in x]
        return f"model inputs {missing} are not in the test split ({sorted(x)})" if missing else None
    if len(inputs) != 1:
        return f"model has {len(inputs)} inputs; the test split is one array"
    shape = inputs[0].shape
    if len(shape) != x.ndim:
        return f"model input {inputs[0].name} has rank {len(shape)}, the test split has shape {list(x.shape[1:])} per sample"
    for want, got in zip(shape[1:], x.shape[1:], strict=True):
        if isinstance(want, int) and want != got:
            return f"model input {inputs[0].name} expects {list(shape)}, the test split has {list(x.shape[1:])} per sample"
    return None


def _seq_note(feed) -> dict:
    """The sequence length a text model was timed at (test rows trimmed to their longest)."""
    mask = feed.get("attention_mask") if isinstance(feed, dict) else None
    return {"sequence": int(mask.shape[1])} if mask is not None and mask.ndim == 2 else {}


def _fixed_batch(inp) -> int | None:
    d = inp.shape[0] if inp.shape else None
    return d if isinstance(d, int) and d > 0 else None


# --------------------------------------------------------------------------- the one measure loop


def measure_loop(spec, call, feed_for, scores=None, y=None) -> dict:
    """Steps 2-5 of the module docstring, the same for every kind of worker.

    ``feed_for(b)`` is the prepared input of batch size ``b`` (or a str: why ``b`` is skipped);
    ``call(feed)`` runs it; ``scores(n)`` the model's outputs on the first ``n`` test rows (None: no
    accuracy). Returns the WorkerResult fields it measured: first_ms, batches, peak memory, metrics.
    """
    first_ms, batches = None, []
    for b in spec.batch_sizes:
        feed = feed_for(b)
        if isinstance(feed, str):
            batches.append({"batch": b, "skipped": feed})
            continue
        if first_ms is None:
            t0 = time.perf_counter()
            call(feed)
            first_ms = (time.perf_counter() - t0) * 1e3
        lat = _time_loop(lambda feed=feed: call(feed), spec.warmup, spec.runs, spec.min_time_s)
        batches.append({"batch": b, "latencies_ns": lat, **_seq_note(feed)})
    peak = _peak_rss_kb()
    metrics = None
    if scores is not None and y is not None:
        n = spec.accuracy_samples or len(y)
        metrics = _metrics(scores(n), np.asarray(y[:n]), spec.num_classes)
    return {"first_ms": first_ms, "batches": batches, "peak_rss_kb": peak,
            "peak_rss_with_accuracy_kb": _peak_rss_kb(), "metrics": metrics}


def _timed(fn):
    """(fn(), milliseconds it took): imports and model loads, parts of a deployer's cold start."""
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def _shape(s) -> list:
    return [d if isinstance(d, int) else str(d) for d in s]


# --------------------------------------------------------------------------- ONNX Runtime


def measure_onnx(spec) -> dict:
    _, import_ms = _timed(lambda: __import__("onnxruntime"))
    from edgecli.runtimes.feeds import synthetic_input
    from edgecli.runtimes.ort import make_session, run_batched

    x, y = _load_inputs(spec)
    rss_before = _rss_kb()
    sess, load_ms = _timed(lambda: make_session(spec.model, threads=spec.threads, providers=spec.providers))
    inputs = sess.get_inputs()
    note = _fit_note(inputs, x)
    rng = np.random.default_rng(0)
    fixed = _fixed_batch(inputs[0]) if len(inputs) == 1 else None
    dtype = ORT_DTYPES.get(inputs[0].type, np.float32)

    def feed_for(b: int):
        if fixed is not None and b != fixed:
            return f"model has a fixed batch size of {fixed}"
        if note is None and isinstance(x, dict):
            return _dict_batch(x, inputs, b)
        if note is None:
            xb = np.asarray(x[:b], dtype=dtype)
            if len(xb) < b:  # fewer test samples than the batch: repeat them
                xb = np.ascontiguousarray(np.resize(xb, (b, *xb.shape[1:])))
            return {inputs[0].name: np.ascontiguousarray(xb)}
        return {i.name: synthetic_input(i.shape, ORT_DTYPES.get(i.type, np.float32), batch=b, rng=rng)
                for i in inputs}

    embedder = sess.get_outputs()[0].name == "embedding"
    scores = None
    if isinstance(x, dict):
        scores = lambda n: run_batched(sess, {k: v[:n] for k, v in x.items()}, 256,  # noqa: E731
                                       prepare=lambda f: _dict_batch(f, inputs, len(next(iter(f.values())))))
    elif x is not None:
        scores = lambda n: run_batched(sess, x[:n], 256, fixed_batch=fixed, dtype=dtype)  # noqa: E731
    m = measure_loop(spec, lambda feed: sess.run(None, feed), feed_for, None if note or embedder else scores, y)
    if embedder:
        note = "an embedding model: no class scores to measure accuracy on (compress reports its cosine fidelity)"
    return {
        "providers_used": sess.get_providers(),
        "input": {"name": inputs[0].name, "shape": _shape(inputs[0].shape), "type": inputs[0].type},
        "synthetic_inputs": note is not None and not embedder, "accuracy_note": note,
        "import_ms": import_ms, "load_ms": load_ms, "rss_before_load_kb": rss_before, **m,
    }


# --------------------------------------------------------------------------- PyTorch eager


def measure_torch(spec) -> dict:
    threads = int(spec.threads)

    def _import():
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable once, before any parallel work
            pass
        return torch

    torch, import_ms = _timed(_import)
    x, y = _load_inputs(spec)
    if x is None:
        raise ValueError("the PyTorch baseline needs the test split")
    info = spec.model_info
    text = isinstance(x, dict)
    names = list(info.get("input_names") or ["input_ids", "attention_mask"]) if text else []
    rss_before = _rss_kb()
    model, load_ms = _timed(lambda: _load_torch_model(spec, info))
    if text:  # the same test rows as the ONNX text models, trimmed the same way
        inputs = [_Int64Input(n) for n in names]

        def call(feed):
            return model(*[torch.from_numpy(feed[n]) for n in names])

        def feed_for(b):
            return _dict_batch(x, inputs, b)

        def scores(n):
            return np.concatenate([call(_dict_batch({k: v[i : i + 256] for k, v in x.items()}, inputs,
                                                    min(256, n - i))).float().numpy() for i in range(0, n, 256)])

        shown = {"name": ",".join(names), "shape": ["batch", "sequence"], "type": "int64"}
    else:
        call = model

        def feed_for(b):
            return torch.from_numpy(np.ascontiguousarray(np.resize(np.asarray(x[:b], dtype=np.float32), (b, *x.shape[1:]))))

        def scores(n):
            xs = np.asarray(x[:n], dtype=np.float32)
            return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(xs[i : i + 256]))).float().numpy()
                                   for i in range(0, n, 256)])

        shown = {"name": "x", "shape": ["batch", *list(x.shape[1:])], "type": "float32"}
    with torch.inference_mode():
        m = measure_loop(spec, call, feed_for, scores, y)
    return {
        "providers_used": ["torch-cpu"], "input": shown, "synthetic_inputs": False, "accuracy_note": None,
        "import_ms": import_ms, "load_ms": load_ms, "rss_before_load_kb": rss_before, **m,
        "torch_threads": torch.get_num_threads(),
    }


class _Int64Input:  # the name and dtype _dict_batch needs of a text model's input
    def __init__(self, name):
        self.name, self.type = name, "tensor(int64)"


def _load_torch_model(spec, info: dict):
    """The trained PyTorch model for the eager baseline (built from model_info, weights loaded)."""
    from edgecli.models import build_from_info
    from edgecli.training import load_weights_file

    model = build_from_info(info)
    model.load_state_dict(load_weights_file(Path(spec.weights)))
    model.eval()
    return model


# --------------------------------------------------------------------------- any runtime of the runtime layer


def measure_runtime(spec) -> dict:
    """``"kind": "runtime"``: LiteRT, ExecuTorch, OpenVINO, ... through ``edgecli.runtimes``."""
    backend, import_ms = _timed(lambda: importlib.import_module("edgecli.runtimes").require(spec.backend))
    x, y = _load_inputs(spec)
    rss_before = _rss_kb()
    sess, load_ms = _timed(lambda: backend.open(spec.model, threads=int(spec.threads), precision=spec.precision))
    names = list(spec.input_names or [i.name for i in sess.inputs])

    def feed_for(b: int, rows=x) -> dict:
        if isinstance(rows, dict):
            feed = {k: np.ascontiguousarray(np.resize(np.asarray(rows[k][:b]), (b, *rows[k].shape[1:])))
                    for k in names if k in rows}
            return _trim(feed)
        xb = np.asarray(rows[:b], dtype=np.float32)
        return {names[0]: np.ascontiguousarray(np.resize(xb, (b, *xb.shape[1:])))}

    def scores(n: int, step: int = 64):
        return np.concatenate([np.asarray(sess.run(feed_for(min(step, n - i), _rows(x, i, i + step)))[0])
                               for i in range(0, n, step)])

    embedder = spec.embedder or (sess.outputs and sess.outputs[0].name == "embedding")
    m = measure_loop(spec, sess.run, feed_for, None if embedder else scores, y)
    note = "an embedding model: no class scores to measure accuracy on (export reports its cosine)" if embedder else None
    return {
        "providers_used": [f"{backend.name}"], "runtime": backend.name, "runtime_version": backend.version(),
        "precision": getattr(sess, "precision", spec.precision), "ran_precision": getattr(sess, "ran_precision", None),
        "input": {"name": names[0], "shape": _shape(sess.inputs[0].shape), "type": str(sess.inputs[0].dtype)},
        "synthetic_inputs": False, "accuracy_note": note,
        "import_ms": import_ms, "load_ms": load_ms, "rss_before_load_kb": rss_before, **m,
    }


def _rows(x, i: int, j: int):
    return {k: v[i:j] for k, v in x.items()} if isinstance(x, dict) else x[i:j]


def _metrics(logits: np.ndarray, y: np.ndarray, num_classes: int | None) -> dict:
    from edgecli.metrics import classification_metrics

    logits = np.asarray(logits)
    pred = logits.reshape(len(logits), -1).argmax(-1)
    k = max(int(num_classes or 0), int(logits.reshape(len(logits), -1).shape[-1]), int(np.max(y)) + 1 if len(y) else 0)
    return classification_metrics(np.asarray(y), pred, k)


def die_with_parent() -> None:
    """Make the kernel SIGKILL this worker when the edgecli process that started it dies (Linux).

    A parent killed with SIGKILL runs no cleanup: without this its worker would go on measuring,
    orphaned, for as long as ``min_time_s`` says. The parent pid is checked after the prctl call, so a
    parent that died before it does not leave the worker running either.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    want = os.environ.get("EDGECLI_PARENT_PID")
    if want and want.isdigit() and os.getppid() != int(want):
        os._exit(1)


MEASURE = {"onnx": measure_onnx, "torch": measure_torch, "runtime": measure_runtime}


def main(argv: list[str]) -> int:
    """Run one measurement; the WorkerResult (or the error) goes to OUT.json, exit status 0 either way.

    The spec is a WorkerSpec (edgecli.runtimes.worker) as JSON, read here as plain attributes: the
    parent validated it, and pydantic is imported only once the memory figures are taken."""
    die_with_parent()
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = SimpleNamespace(**json.loads(spec_path.read_text()))
    try:
        if getattr(spec, "profile", None):  # bench --profile: a short run with the runtime's profiler on
            from edgecli.runtimes.profile import run as profile_run

            res = profile_run(spec)
        else:
            res = MEASURE[spec.kind](spec)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the parent, which turns it into a one-line error
        res = _error(e)
    res["torch_imported"] = "torch" in sys.modules
    res["pid"] = os.getpid()
    from edgecli.runtimes.worker import WorkerResult

    try:
        res = WorkerResult.model_validate(res).model_dump()
    except Exception as e:  # noqa: BLE001 - a result that breaks the contract is this worker's bug: say so
        res = {**_error(e), "torch_imported": res["torch_imported"], "pid": res["pid"]}
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out_path)
    return 0


def _error(e: Exception) -> dict:
    from edgecli.errors import ConfigError, EdgeError

    msg = e.message if isinstance(e, EdgeError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {"ok": False, "error": msg, "user_error": isinstance(e, EdgeError), "config_error": isinstance(e, ConfigError),
            "traceback": traceback.format_exc()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
