"""ONNX Runtime backend of the runtime layer: sessions (providers, threads, optimisation level), batched runs."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from edgecli.errors import CheckFailed, ModelFileError


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
                 optimization: str = "all", log_errors_only: bool = True, profile_prefix: str | None = None):
    """An InferenceSession with explicit threads (intra-op) and sequential execution.

    ``profile_prefix``: ONNX Runtime's own profiler on, its chrome-trace JSON written by
    ``end_profiling()`` to ``<prefix>_<timestamp>.json`` (edgecli.runtimes.profile)."""
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
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
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


def _first_output(sess, feed: dict[str, np.ndarray]) -> np.ndarray:
    if hasattr(sess, "get_inputs"):  # an InferenceSession
        return sess.run(None, feed)[0]
    return sess.run(feed)[0]  # a runtime-layer Session


def _input_names(sess) -> list[str]:
    return [i.name for i in (sess.get_inputs() if hasattr(sess, "get_inputs") else sess.inputs)]


def run_batched(sess, x: np.ndarray | dict, batch_size: int = 256, *, fixed_batch: int | None = None,
                dtype=None, prepare=None) -> np.ndarray:
    """Run the first output over ``x`` in batches (x: one array, or a dict of named arrays).

    ``sess``: an InferenceSession or a runtime-layer Session. ``fixed_batch``: the batch size of a
    model whose batch dim is fixed; chunks have that size, the last one padded with copies of its
    last row (cut from the output again). ``dtype``: each chunk is cast to it (a memory-mapped
    split read as stored). ``prepare``: applied to each chunk's feeds before the run.
    """
    step = fixed_batch or batch_size
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        chunks = ({k: v[i : i + step] for k, v in x.items()} for i in range(0, n, step))
    else:
        name = _input_names(sess)[0]
        chunks = ({name: x[i : i + step]} for i in range(0, len(x), step))
    outs = []
    for feed in chunks:
        if dtype is not None:
            feed = {k: np.asarray(v, dtype=dtype) for k, v in feed.items()}
        rows = len(next(iter(feed.values())))
        if fixed_batch and rows < fixed_batch:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], fixed_batch - rows, axis=0)]) for k, v in feed.items()}
        if prepare is not None:
            feed = prepare(feed)
        out = _first_output(sess, feed)
        outs.append(np.asarray(out)[:rows] if fixed_batch else out)
    return np.concatenate(outs) if outs else np.zeros((0,))


# --------------------------------------------------------------------------- offline conversion


def optimize_offline(src: Path, dst: Path, level: str) -> None:
    """ONNX Runtime's offline graph optimisation at a portable level (basic, extended), saved as ONNX."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300]
        raise ModelFileError(f"export: ONNX Runtime cannot load the input model ({msg})") from None


def convert_to_ort(model: Path, out_dir: Path, level: str) -> tuple[Path, Path]:
    """model.ort + required_operators.config via onnxruntime.tools (offline), at ``level``."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from edgecli.safeio import temp_dir

    with temp_dir("ort") as tmp:
        src_dir = Path(tmp) / "in"
        dst_dir = Path(tmp) / "out"
        src_dir.mkdir()
        shutil.copyfile(model, src_dir / "model.onnx")
        old = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
        # the tool defaults to level "all"; keep the .ort as portable as model.onnx
        os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = level
        buf = io.StringIO()
        logger = logging.getLogger("ort_format_model.utils")
        old_level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(buf):  # the tool prints progress; stdout is for results
                convert_onnx_models_to_ort(src_dir / "model.onnx", output_dir=dst_dir,
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckFailed(f"export: conversion to ORT format failed ({msg})") from None
        finally:
            logger.setLevel(old_level)
            if old is None:
                os.environ.pop("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", None)
            else:
                os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = old
        orts = sorted(dst_dir.glob("*.ort"))
        cfgs = sorted(dst_dir.glob("*.config"))
        if not orts or not cfgs:
            raise CheckFailed(f"export: ORT format conversion wrote no model ({buf.getvalue().strip()[-200:]})")
        ort_path, cfg_path = out_dir / "model.ort", out_dir / "required_operators.config"
        shutil.copyfile(orts[0], ort_path)
        shutil.copyfile(cfgs[0], cfg_path)
    return ort_path, cfg_path


class OrtStyleSession:
    """An InferenceSession (or anything with its get_inputs/get_outputs/run(None, feeds) calls) behind the
    runtime layer's Session protocol."""

    def __init__(self, sess, precision: str = "fp32", backend: str = "onnxruntime"):
        from edgecli.runtimes import TensorSpec

        self.backend = backend
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
        return OrtStyleSession(make_session(path, threads=threads, providers=providers), precision or "fp32")


BACKEND = _OrtBackend()
