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
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

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


def _load_inputs(spec: dict):
    """(x, y) from the parent's .npy files, memory-mapped so only the rows used are read."""
    x = None
    if spec.get("x") and str(spec["x"]).endswith(".npz"):  # text: one array per model input
        with np.load(spec["x"], allow_pickle=False) as z:
            x = {k: z[k] for k in z.files}
    elif spec.get("x"):
        x = np.load(spec["x"], mmap_mode="r")
    y = np.load(spec["y"]) if spec.get("y") else None
    return x, y


def _trim(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A text batch cut to its longest sentence (infer pads to the batch's longest, never further)."""
    mask = feed.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return feed
    n = max(1, int(mask.sum(axis=1).max()))
    return {k: np.ascontiguousarray(v[:, :n]) if v.ndim == 2 else v for k, v in feed.items()}


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


def _seq_note(feed: dict) -> dict:
    """The sequence length a text model was timed at (test rows trimmed to their longest)."""
    mask = feed.get("attention_mask")
    return {"sequence": int(mask.shape[1])} if mask is not None and mask.ndim == 2 else {}


def _fixed_batch(inp) -> int | None:
    d = inp.shape[0] if inp.shape else None
    return d if isinstance(d, int) and d > 0 else None


def measure_onnx(spec: dict) -> dict:
    t0 = time.perf_counter()
    import onnxruntime  # noqa: F401 - timed on its own: part of a deployer's cold start

    from edgecli.runtimes.feeds import synthetic_input
    from edgecli.runtimes.ort import make_session, run_batched

    import_ms = (time.perf_counter() - t0) * 1e3
    x, y = _load_inputs(spec)
    rss_before = _rss_kb()
    t0 = time.perf_counter()
    sess = make_session(spec["model"], threads=spec["threads"], providers=spec["providers"])
    load_ms = (time.perf_counter() - t0) * 1e3
    inputs = sess.get_inputs()
    note = _fit_note(inputs, x)
    rng = np.random.default_rng(0)
    batch_sizes = spec["batch_sizes"]
    fixed = _fixed_batch(inputs[0]) if len(inputs) == 1 else None

    def feed_for(b: int) -> dict:
        if note is None and isinstance(x, dict):
            return _dict_batch(x, inputs, b)
        if note is None:
            xb = np.asarray(x[:b], dtype=ORT_DTYPES.get(inputs[0].type, np.float32))
            if len(xb) < b:  # fewer test samples than the batch: repeat them
                xb = np.ascontiguousarray(np.resize(xb, (b, *xb.shape[1:])))
            return {inputs[0].name: np.ascontiguousarray(xb)}
        return {i.name: synthetic_input(i.shape, ORT_DTYPES.get(i.type, np.float32), batch=b, rng=rng)
                for i in inputs}

    runnable = [b for b in batch_sizes if fixed is None or b == fixed]
    first_ms = None
    batches = []
    for b in batch_sizes:
        if b not in runnable:
            batches.append({"batch": b, "skipped": f"model has a fixed batch size of {fixed}"})
            continue
        feed = feed_for(b)
        if first_ms is None:
            t0 = time.perf_counter()
            sess.run(None, feed)
            first_ms = (time.perf_counter() - t0) * 1e3
        lat = _time_loop(lambda feed=feed: sess.run(None, feed), spec["warmup"], spec["runs"], spec.get("min_time_s"))
        batches.append({"batch": b, "latencies_ns": lat, **_seq_note(feed)})
    peak = _peak_rss_kb()

    metrics = None
    embedder = sess.get_outputs()[0].name == "embedding"
    if embedder:
        note = "an embedding model: no class scores to measure accuracy on (compress reports its cosine fidelity)"
    if note is None and y is not None and isinstance(x, dict):
        n = spec.get("accuracy_samples") or len(y)
        logits = run_batched(sess, {k: v[:n] for k, v in x.items()}, 256,
                             prepare=lambda f: _dict_batch(f, inputs, len(next(iter(f.values())))))
        metrics = _metrics(logits, y[:n], spec.get("num_classes"))
    elif note is None and y is not None:
        n = spec.get("accuracy_samples") or len(y)
        dtype = ORT_DTYPES.get(inputs[0].type, np.float32)
        logits = run_batched(sess, x[:n], 256, fixed_batch=fixed, dtype=dtype)
        metrics = _metrics(logits, y[:n], spec.get("num_classes"))
    return {
        "providers_used": sess.get_providers(),
        "input": {"name": inputs[0].name, "shape": [d if isinstance(d, int) else str(d) for d in inputs[0].shape],
                  "type": inputs[0].type},
        "synthetic_inputs": note is not None and not embedder,
        "accuracy_note": note,
        "import_ms": import_ms, "load_ms": load_ms, "first_ms": first_ms,
        "rss_before_load_kb": rss_before, "peak_rss_kb": peak, "peak_rss_with_accuracy_kb": _peak_rss_kb(),
        "batches": batches, "metrics": metrics,
    }


# --------------------------------------------------------------------------- PyTorch eager


def measure_torch(spec: dict) -> dict:
    threads = int(spec["threads"])
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable once, before any parallel work
        pass

    import_ms = (time.perf_counter() - t0) * 1e3
    x, y = _load_inputs(spec)
    if x is None:
        raise ValueError("the PyTorch baseline needs the test split")
    info = spec["model_info"]
    if isinstance(x, dict):
        return _measure_torch_text(spec, x, y, info, import_ms, threads)
    rss_before = _rss_kb()
    model, load_ms = _load_torch_model(spec, info)
    first_ms = None
    batches = []
    with torch.inference_mode():
        for b in spec["batch_sizes"]:
            xb = np.ascontiguousarray(np.resize(np.asarray(x[:b], dtype=np.float32), (b, *x.shape[1:])))
            tb = torch.from_numpy(xb)
            if first_ms is None:
                t0 = time.perf_counter()
                model(tb)
                first_ms = (time.perf_counter() - t0) * 1e3
            lat = _time_loop(lambda tb=tb: model(tb), spec["warmup"], spec["runs"], spec.get("min_time_s"))
            batches.append({"batch": b, "latencies_ns": lat})
        peak = _peak_rss_kb()
        metrics = None
        if y is not None:
            n = spec.get("accuracy_samples") or len(y)
            xs = np.asarray(x[:n], dtype=np.float32)
            logits = np.concatenate([model(torch.from_numpy(np.ascontiguousarray(xs[i : i + 256]))).float().numpy()
                                     for i in range(0, n, 256)])
            metrics = _metrics(logits, y[:n], spec.get("num_classes"))
    return {
        "providers_used": ["torch-cpu"], "input": {"name": "x", "shape": ["batch", *list(x.shape[1:])], "type": "float32"},
        "synthetic_inputs": False, "accuracy_note": None,
        "import_ms": import_ms, "load_ms": load_ms, "first_ms": first_ms,
        "rss_before_load_kb": rss_before, "peak_rss_kb": peak, "peak_rss_with_accuracy_kb": _peak_rss_kb(),
        "batches": batches, "metrics": metrics, "torch_threads": torch.get_num_threads(),
    }


def _measure_torch_text(spec: dict, x: dict, y, info: dict, import_ms: float, threads: int) -> dict:
    """PyTorch eager baseline of a text model: the same test rows, trimmed the same way."""
    import torch


    names = list(info.get("input_names") or ["input_ids", "attention_mask"])
    rss_before = _rss_kb()
    model, load_ms = _load_torch_model(spec, info)

    class _I:  # the names and dtypes _dict_batch needs
        def __init__(self, name):
            self.name, self.type = name, "tensor(int64)"

    inputs = [_I(n) for n in names]

    def call(feed):
        return model(*[torch.from_numpy(feed[n]) for n in names])

    first_ms, batches = None, []
    with torch.inference_mode():
        for b in spec["batch_sizes"]:
            feed = _dict_batch(x, inputs, b)
            if first_ms is None:
                t0 = time.perf_counter()
                call(feed)
                first_ms = (time.perf_counter() - t0) * 1e3
            lat = _time_loop(lambda feed=feed: call(feed), spec["warmup"], spec["runs"], spec.get("min_time_s"))
            batches.append({"batch": b, "latencies_ns": lat, **_seq_note(feed)})
        peak = _peak_rss_kb()
        metrics = None
        if y is not None:
            n = spec.get("accuracy_samples") or len(y)
            logits = np.concatenate([call(_dict_batch({k: v[i : i + 256] for k, v in x.items()}, inputs,
                                                      min(256, n - i))).float().numpy() for i in range(0, n, 256)])
            metrics = _metrics(logits, y[:n], spec.get("num_classes"))
    return {
        "providers_used": ["torch-cpu"], "input": {"name": ",".join(names), "shape": ["batch", "sequence"], "type": "int64"},
        "synthetic_inputs": False, "accuracy_note": None,
        "import_ms": import_ms, "load_ms": load_ms, "first_ms": first_ms,
        "rss_before_load_kb": rss_before, "peak_rss_kb": peak, "peak_rss_with_accuracy_kb": _peak_rss_kb(),
        "batches": batches, "metrics": metrics, "torch_threads": torch.get_num_threads(),
    }


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


def main(argv: list[str]) -> int:
    """Run one measurement; the result (or the error) goes to OUT.json, exit status 0 either way."""
    die_with_parent()
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        if spec["kind"] == "runtime":  # any backend of the runtime layer (LiteRT, ExecuTorch, OpenVINO, ...)
            from edgecli.runtimes.worker import measure_runtime

            res = measure_runtime(spec)
        else:
            res = measure_torch(spec) if spec["kind"] == "torch" else measure_onnx(spec)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the parent, which turns it into a one-line error
        from edgecli.errors import EdgeError

        msg = e.message if isinstance(e, EdgeError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res = {"ok": False, "error": msg, "user_error": isinstance(e, EdgeError), "traceback": traceback.format_exc()}
    res["torch_imported"] = "torch" in sys.modules
    res["pid"] = os.getpid()
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out_path)
    return 0


def _load_torch_model(spec: dict, info: dict):
    """The trained PyTorch model for the eager baseline, and how long building + loading took (ms)."""
    from edgecli.models import build_from_info
    from edgecli.training import load_weights_file

    t0 = time.perf_counter()
    model = build_from_info(info)
    model.load_state_dict(load_weights_file(Path(spec["weights"])))
    model.eval()
    return model, (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
