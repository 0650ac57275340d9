"""ExecuTorch backend: a ``.pte`` program lowered to XNNPACK from the PyTorch module.

- ``fp32``: ``torch.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])``
  -> ``.to_executorch()``;
- ``int8``: PT2E first: ``XNNPACKQuantizer`` with the symmetric per-channel config,
  ``prepare_pt2e`` -> calibration on training samples -> ``convert_pt2e`` (torchao), then the same
  lowering: XNNPACK runs the quantized convolutions and linears in INT8.

The program is exported at batch 1 (the phone case); a larger batch runs row by row.
``open`` runs it with ``executorch.runtime`` (which needs torch for its tensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecli.errors import ModelFileError
from edgecli.runtimes import TorchConverted

PRECISIONS = ("fp32", "int8")


class _EtSession:
    backend = "executorch"

    def __init__(self, method, precision: str, inputs, outputs):
        import torch

        self._torch = torch
        self.method = method
        self.precision = precision
        self.inputs = inputs
        self.outputs = outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from edgecli.runtimes import by_position, rows_of

        arrays = list(by_position(self.inputs, feeds).values())
        outs = []
        for row in rows_of(arrays, self.inputs):
            res = self.method.execute([self._torch.from_numpy(a) for a in row])
            outs.append([np.asarray(r.detach().numpy() if hasattr(r, "detach") else r) for r in res])
        n = len(arrays[0])
        return [np.concatenate([o[k] for o in outs])[:n] for k in range(len(outs[0]))]


def _convert(module, example: tuple, out_path: Path, precision: str, calib: list[tuple] | None) -> Path:
    """``out_path`` (.pte) from the eval-mode ``module`` traced on ``example`` (batch-1 tensors)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        ep = torch.export.export(module, example, strict=False)
        if precision == "int8":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(ep.module(), q)
            for sample in calib or [example]:
                prepared(*sample)
            ep = torch.export.export(convert_pt2e(prepared), example, strict=False)
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    out_path.write_bytes(prog.buffer)
    return out_path


def _open(path, threads: int, precision: str | None, etdump: bool = False) -> _EtSession:
    """``etdump``: the runtime's event tracer on (ETDump, read by edgecli.runtimes.profile)."""
    from edgecli.runtimes import TensorSpec, quiet_native_stderr

    try:
        with quiet_native_stderr():
            from executorch.runtime import Runtime

            _set_threads(threads)
            program = Runtime.get().load_program(Path(path), enable_etdump=etdump)
            method = program.load_method("forward")
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError with its status code
        raise ModelFileError(f"{path}: ExecuTorch cannot load this program "
                             f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:300]})") from None
    meta = method.metadata
    inputs = [TensorSpec(f"input_{i}", tuple(meta.input_tensor_meta(i).sizes()),
                         _dtype(meta.input_tensor_meta(i).dtype())) for i in range(meta.num_inputs())]
    outputs = [TensorSpec(f"output_{i}", tuple(meta.output_tensor_meta(i).sizes()),
                          _dtype(meta.output_tensor_meta(i).dtype())) for i in range(meta.num_outputs())]
    # a .pte does not say how it was quantized; edgecli names the INT8 file model-int8.pte
    precision = precision or ("int8" if "int8" in Path(path).stem else "fp32")
    sess = _EtSession(method, precision, inputs, outputs)
    sess.program = program  # write_etdump_result_to_file lives on the program
    return sess


def _set_threads(threads: int) -> None:
    """XNNPACK's thread pool is process-wide; size it to the thread count asked for."""
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(int(threads))
    except (ImportError, AttributeError, RuntimeError):
        pass


# ExecuTorch ScalarType codes -> numpy (the ones a model input or output takes)
_SCALAR = {6: np.float32, 7: np.float64, 4: np.int64, 3: np.int32, 1: np.int8, 0: np.uint8, 11: np.bool_, 5: np.float16}


def _dtype(code) -> np.dtype:
    return np.dtype(_SCALAR.get(int(code), np.float32))


BACKEND = TorchConverted("executorch", "ExecuTorch", "executorch", ".pte", ("executorch", "torchao"), "executorch",
                         PRECISIONS, _convert, _open)
