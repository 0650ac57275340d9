"""OpenVINO backend: an IR (``model.xml`` + ``model.bin``) converted from the float ONNX model.

Precisions (the hint is stored in the IR's rt_info, so ``open`` runs what the card says):

- ``fp32``: ``INFERENCE_PRECISION_HINT=f32``. Always set: on a CPU with AMX, OpenVINO's own
  default is bf16, and an "fp32" figure measured at its default would be a bf16 one;
- ``bf16``: ``INFERENCE_PRECISION_HINT=bf16`` (only where the CPU reports BF16), weights stored FP16;
- ``int8-weights`` / ``int8-weights+bf16``: ``nncf.compress_weights`` (INT8 weights, asymmetric),
  computed in f32 / bf16;
- ``int8`` / ``int8+bf16``: ``nncf.quantize`` (static INT8, calibrated on training samples); the
  transformer preset for text models. OpenVINO does not compile ONNX Runtime's QDQ models
  ("No suitable implementations"), so INT8 is always made here, by NNCF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecli.errors import ConfigError, ModelFileError
from edgecli.runtimes import install_errors

PRECISIONS = ("fp32", "bf16", "int8-weights", "int8-weights+bf16", "int8", "int8+bf16")
_RT_KEY = ["edgecli", "precision"]


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 here (AVX512_BF16 or AMX); False when it cannot tell
    (no such property, or an install that does not import: converting then names the extra)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no CPU plugin property, or a broken install: treat as no bf16
        return False


def ran_precision(precision: str, hint: str) -> str:
    """What ran, in words: the compiled inference precision (``f32``/``bf16``), after what NNCF made INT8
    ("int8 weights + bf16": INT8 weights dequantized into bf16 compute; "int8 + f32": INT8 kernels, the
    operations NNCF left in float computed in f32)."""
    made = {"int8-weights": "int8 weights", "int8": "int8"}.get(precision.split("+")[0])
    return f"{made} + {hint}" if made else hint


def _hint(precision: str) -> str:
    return "bf16" if precision.endswith("bf16") else "f32"


class _OvSession:
    backend = "openvino"

    def __init__(self, compiled, precision: str, threads: int):
        from edgecli.runtimes import TensorSpec

        self.compiled = compiled
        self.precision = precision
        self.threads = threads
        self.request = compiled.create_infer_request()
        self.inputs = [TensorSpec(p.get_any_name(), _shape(p), _dtype(p)) for p in compiled.inputs]
        self.outputs = [TensorSpec(p.get_any_name(), _shape(p), _dtype(p)) for p in compiled.outputs]
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin really computes in
        self.ran_precision = ran_precision(precision, hint.get_type_name() if hasattr(hint, "get_type_name")
                                           else str(hint))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from edgecli.runtimes import by_position

        res = self.request.infer(by_position(self.inputs, feeds))
        return [np.array(res[o]) for o in self.compiled.outputs]


def _shape(port) -> tuple:
    ps = port.get_partial_shape()
    return tuple(d.get_length() if d.is_static else None for d in ps)


def _dtype(port) -> np.dtype:
    try:
        return np.dtype(port.get_element_type().to_dtype())
    except Exception:  # noqa: BLE001 - bf16/f16 have no numpy dtype: callers feed float32
        return np.dtype(np.float32)


class _OpenVinoBackend:
    name = "openvino"
    extra = "openvino"
    suffix = ".xml"
    source = "onnx"  # converts from the float ONNX model
    precisions = PRECISIONS

    def unavailable(self) -> str | None:
        from edgecli.runtimes import missing_extra

        return missing_extra("OpenVINO", "openvino", ("openvino", "nncf"))

    def version(self) -> str:
        import openvino as ov

        return ov.get_version().split("-")[0]

    def candidates(self) -> list[str]:
        """Precisions worth trying on this CPU: FP32, INT8 weights (``compress_weights``) and static INT8
        (``quantize``) everywhere, each also computed in bf16 where the CPU computes bf16."""
        f32 = ["fp32", "int8-weights", "int8"]
        return f32 + (["bf16", "int8-weights+bf16", "int8+bf16"] if cpu_has_bf16() else [])

    @install_errors
    def convert(self, onnx_path: Path, out_path: Path, *, precision: str = "fp32", calib: dict | None = None,
                text: bool = False) -> Path:
        """``out_path`` (.xml, with its .bin) from the float ONNX model at ``precision``."""
        import openvino as ov

        if precision not in PRECISIONS:
            raise ConfigError(f"openvino: unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
        core = ov.Core()
        try:
            model = core.read_model(str(onnx_path))
        except Exception as e:  # noqa: BLE001 - the reader raises bare RuntimeErrors
            raise ModelFileError(f"{onnx_path}: OpenVINO cannot read this model ({_line(e)})") from None
        if precision.startswith("int8-weights"):
            import nncf

            model = nncf.compress_weights(model)
        elif precision.startswith("int8"):
            import nncf

            if not calib:
                raise ConfigError("openvino int8: static INT8 needs calibration samples")
            n = len(next(iter(calib.values())))
            items = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]
            kw = {"model_type": nncf.ModelType.TRANSFORMER} if text else {}
            model = nncf.quantize(model, nncf.Dataset(items), subset_size=n, **kw)
        model.set_rt_info(precision, _RT_KEY)
        # bf16 runs keep FP16 weights on disk (half the size; the CPU plugin converts them once at load)
        ov.save_model(model, str(out_path), compress_to_fp16=precision == "bf16")
        return out_path

    @install_errors
    def open(self, path, *, threads: int = 1, precision: str | None = None, perf_count: bool = False) -> _OvSession:
        """``perf_count``: the plugin's per-node performance counters on (edgecli.runtimes.profile)."""
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{path}: OpenVINO cannot read this model ({_line(e)})") from None
        if precision is None:
            precision = model.get_rt_info(_RT_KEY).astype(str) if model.has_rt_info(_RT_KEY) else "fp32"
        if _hint(precision) == "bf16" and not cpu_has_bf16():
            precision = precision.replace("bf16", "").rstrip("+") or "fp32"
        cfg = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
               "INFERENCE_PRECISION_HINT": _hint(precision), **({"PERF_COUNT": True} if perf_count else {})}
        try:
            compiled = core.compile_model(model, "CPU", cfg)
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{path}: OpenVINO cannot compile this model ({_line(e)})") from None
        return _OvSession(compiled, precision, threads)


def _line(e: Exception) -> str:
    """OpenVINO's message without its "Exception from src/...cpp:84:" location lines, which say nothing."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if not (ln.startswith("Exception from ") and ln.endswith(":"))]
    return (said or lines or [type(e).__name__])[0][:300]


BACKEND = _OpenVinoBackend()
