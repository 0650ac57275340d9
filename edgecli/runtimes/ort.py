"""ONNX Runtime backend of the runtime layer: sessions (providers, threads, optimisation level), batched runs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from edgecli.errors import ModelFileError


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(usable, skipped) providers; CPU is always appended as the fallback."""
    avail = available_providers()
    requested = requested or ["CPUExecutionProvider"]
    usable = [p for p in requested if p in avail]
    skipped = [p for p in requested if p not in avail]
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    return usable, skipped


def make_session(path: str | Path, *, threads: int = 1, providers: list[str] | None = None,
                 optimization: str = "all", log_errors_only: bool = True):
    """An InferenceSession with explicit threads (intra-op) and sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if log_errors_only and not os.environ.get("EDGECLI_VERBOSE"):
        # fatal only: a failure's text reaches the user in our one-line error instead
        so.log_severity_level = 4
    usable, _ = resolve_providers(providers)
    try:
        # ONNX Runtime print()s provider fallback banners; they must never reach --json stdout
        with contextlib.redirect_stdout(sys.stderr):
            return ort.InferenceSession(str(path), sess_options=so, providers=usable)
    except Exception as e:
        msg = str(e).splitlines()[0][:300]
        raise ModelFileError(f"{path}: ONNX Runtime cannot load this model ({msg})") from None


def run_batched(sess, x: np.ndarray | dict, batch_size: int = 256) -> np.ndarray:
    """Run the first output over ``x`` in batches (x: one array, or a dict of named arrays)."""
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        outs = [sess.run(None, {k: v[i : i + batch_size] for k, v in x.items()})[0] for i in range(0, n, batch_size)]
    else:
        name = sess.get_inputs()[0].name
        outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,))


class _OrtSession:
    """An InferenceSession behind the runtime layer's Session protocol."""

    backend = "onnxruntime"

    def __init__(self, sess, precision: str = "fp32"):
        from edgecli.runtimes import TensorSpec

        self.sess = sess
        self.precision = precision
        self.inputs = [TensorSpec(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.dtype(np.float32)))
                       for i in sess.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), ORT_DTYPES.get(o.type, np.dtype(np.float32)))
                        for o in sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)


# ONNX Runtime type strings -> numpy dtypes
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


class _OrtBackend:
    name = "onnxruntime"
    extra = None
    suffix = ".onnx"

    def unavailable(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:  # pragma: no cover - a core dependency
            return f"onnxruntime does not import ({e}); reinstall edgecli"
        return None

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def open(self, path, *, threads: int = 1, precision: str | None = None, providers: list[str] | None = None):
        return _OrtSession(make_session(path, threads=threads, providers=providers), precision or "fp32")


BACKEND = _OrtBackend()
