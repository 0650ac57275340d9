"""LiteRT (TensorFlow Lite) backend: a ``.tflite`` flatbuffer converted from the PyTorch module.

- ``fp32``: ``litert_torch.convert(module, example).export(path)``; no TensorFlow needed;
- ``int8``: litert-torch's PT2E quantizer (``PT2EQuantizer`` with the symmetric per-channel
  config, static activations), ``prepare_pt2e`` -> calibration on training samples ->
  ``convert_pt2e``, then the same conversion with ``quant_config``.

The model is converted at batch 1 (the phone case); a larger batch runs row by row.
``open`` runs it with ``ai_edge_litert.interpreter.Interpreter(num_threads=...)``: the
interpreter a deployer ships (it imports neither torch nor TensorFlow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecli.errors import ModelFileError
from edgecli.runtimes import TorchConverted

PRECISIONS = ("fp32", "int8")


class _LiteRtSession:
    backend = "litert"

    def __init__(self, interp, precision: str):
        from edgecli.runtimes import TensorSpec

        self.interp = interp
        self.precision = precision
        self._in = interp.get_input_details()
        self._out = interp.get_output_details()
        # a fully integer model takes and gives int8: the session quantizes float feeds with the
        # file's own scale/zero point (as a deployer's pre/post-processing does), so callers feed floats
        self.inputs = [TensorSpec(d["name"], tuple(int(x) for x in d["shape"]), _outer(d)) for d in self._in]
        self.outputs = [TensorSpec(d["name"], tuple(int(x) for x in d["shape"]), _outer(d)) for d in self._out]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from edgecli.runtimes import by_position, rows_of

        arrays = list(by_position(self.inputs, feeds).values())
        n = len(arrays[0])
        outs = []
        for row in rows_of(arrays, self.inputs):
            for d, a in zip(self._in, row, strict=True):
                self.interp.set_tensor(d["index"], _quantize(a, d))
            self.interp.invoke()
            outs.append([_dequantize(self.interp.get_tensor(d["index"]), d) for d in self._out])
        return [np.concatenate([o[k] for o in outs])[:n] for k in range(len(self._out))]


def _convert(module, example: tuple, out_path: Path, precision: str, calib: list[tuple] | None) -> Path:
    """``out_path`` (.tflite) from the eval-mode ``module`` traced on ``example`` (batch-1 tensors)."""
    import litert_torch
    import torch

    with torch.no_grad():
        if precision == "fp32":
            edge = litert_torch.convert(module, example)
        else:
            from litert_torch.quantize.pt2e_quantizer import (
                PT2EQuantizer,
                get_symmetric_quantization_config,
            )
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            q = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
            prepared = prepare_pt2e(torch.export.export(module, example, strict=False).module(), q)
            for sample in calib or [example]:
                prepared(*sample)
            edge = litert_torch.convert(convert_pt2e(prepared, fold_quantize=False), example,
                                        quant_config=QuantConfig(pt2e_quantizer=q))
    edge.export(str(out_path))
    return out_path


def _open(path, threads: int, precision: str | None) -> _LiteRtSession:
    from ai_edge_litert.interpreter import Interpreter

    from edgecli.runtimes import quiet_native_stderr

    try:
        with quiet_native_stderr():
            interp = Interpreter(model_path=str(path), num_threads=int(threads))
            interp.allocate_tensors()
    except Exception as e:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError with its text
        raise ModelFileError(f"{path}: LiteRT cannot load this model "
                             f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:300]})") from None
    return _LiteRtSession(interp, precision or _precision_of(interp))


def _scale(d) -> tuple[float, int] | None:
    scale, zp = d.get("quantization") or (0.0, 0)
    return (float(scale), int(zp)) if scale and np.dtype(d["dtype"]).kind in "iu" else None


def _outer(d) -> np.dtype:
    return np.dtype(np.float32) if _scale(d) else np.dtype(d["dtype"])


def _quantize(a: np.ndarray, d) -> np.ndarray:
    q = _scale(d)
    if q is None:
        return np.ascontiguousarray(a, dtype=d["dtype"])
    info = np.iinfo(d["dtype"])
    return np.clip(np.round(a / q[0]) + q[1], info.min, info.max).astype(d["dtype"])


def _dequantize(a: np.ndarray, d) -> np.ndarray:
    q = _scale(d)
    return a.copy() if q is None else (a.astype(np.float32) - q[1]) * np.float32(q[0])


def _precision_of(interp) -> str:
    """int8 when the flatbuffer holds int8 weights, else fp32."""
    try:
        return "int8" if any(np.dtype(t["dtype"]) == np.int8 for t in interp.get_tensor_details()) else "fp32"
    except Exception:  # noqa: BLE001
        return "fp32"


BACKEND = TorchConverted("litert", "LiteRT", "litert", ".tflite", ("ai_edge_litert", "litert_torch"), "ai-edge-litert",
                         PRECISIONS, _convert, _open)
