"""The quantize modes as one table: name -> how to build it, whether it calibrates, where it applies.

``MODES[q.mode]`` is all a quantize step needs to know about its mode: ``build`` writes the candidate
file from a ``QuantizeConfig`` (edgecli.config), ``needs_calibration`` says whether it reads
calibration inputs, ``applies(model)`` why it cannot run on a graph (None when it can), and
``record`` the options report.json lists for it. ``auto`` is not a mode but a plan over them
(edgecli.compression.quantize). The file builders below wrap ONNX Runtime's quantizers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecli.runtimes.feeds import InputSpec, n_samples

if TYPE_CHECKING:
    from edgecli.config import QuantizeConfig

# Ops ONNX Runtime's dynamic quantizer handles well (weights of MatMul-heavy models). Conv is
# left out in `auto`: dynamic Conv runs as ConvInteger, 7-11x slower than FP32 here.
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU", "EmbedLayerNormalization")
# INT8 weight-only (MatMulNBits bits=8): accuracy_level 4 computes in int8 with per-block activation
# scales (the VNNI path); the default level dequantizes to FP32 and ran 4x slower than FP32 on MiniLM
# here. `auto` tries block 128 (faster) and the step's block_size (default 32: closer to FP32).
INT8_WO_ACCURACY_LEVEL = 4


# --------------------------------------------------------------------------- file builders


@contextlib.contextmanager
def quiet_ort():
    """onnxruntime.quantization logs every node at INFO/WARNING; keep the terminal for results."""
    lg = logging.getLogger()
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


@contextlib.contextmanager
def _in_dir(path: Path):
    """Run a third-party call that writes into the current directory inside ``path`` instead."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def pre_process(src: Path, dst: Path) -> list[str]:
    """ONNX Runtime's quantization pre-processing (symbolic + ONNX shape inference, optimisation).

    Falls back to fewer passes when one fails on an unusual graph, and says so.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    attempts = [
        ("shape inference + optimisation", {}),
        ("ONNX shape inference + optimisation (symbolic shape inference failed)", {"skip_symbolic_shape": True}),
        ("shape inference only (graph optimisation failed)", {"skip_optimization": True, "skip_symbolic_shape": True}),
    ]
    src, dst = Path(src).resolve(), Path(dst).resolve()
    for what, kw in attempts:
        try:
            # ORT's symbolic shape inference saves "sym_shape_infer_temp.onnx" + a <uuid>.data file
            # (90 MB for MiniLM) in the current directory and leaves the data behind: run it in ours
            with quiet_ort(), _in_dir(dst.parent):
                quant_pre_process(str(src), str(dst), **kw)
            if kw:
                notes.append(f"quantization pre-processing: {what}")
            return notes
        except Exception as e:  # noqa: BLE001 - third-party passes fail in many ways; try fewer
            notes.append(f"quantization pre-processing: {what} failed ({type(e).__name__})")
    shutil.copyfile(src, dst)
    notes.append("quantization pre-processing skipped; quantizing the model as given")
    return notes


class _Reader:
    """CalibrationDataReader over in-memory inputs (batch 1 when the model's batch is fixed)."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int):
        self.feeds, self.batch, self.i = feeds, batch, 0

    def get_next(self):
        n = n_samples(self.feeds)
        if self.i >= n:
            return None
        out = {k: v[self.i : self.i + self.batch] for k, v in self.feeds.items()}
        self.i += self.batch
        return out

    def rewind(self):
        self.i = 0


def _reader(feeds, inputs: list[InputSpec]):
    from onnxruntime.quantization import CalibrationDataReader

    batch = 1 if any(spec.shape and spec.shape[0] == 1 for spec in inputs) else 32
    r = _Reader(feeds, batch)
    CalibrationDataReader.register(_Reader)
    return r


def quantize_static_file(src: Path, dst: Path, calib: dict[str, np.ndarray], inputs: list[InputSpec], *,
                         fmt: str = "qdq", per_channel: bool = True, reduce_range: bool = False,
                         method: str = "minmax", nodes_to_exclude=(), op_types=None, cache: Path | None = None) -> None:
    """Static INT8 (U8 activations, S8 weights: the VNNI path on x86) with calibration ranges cached
    in ``cache`` so that re-quantizing with excluded nodes skips calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    extra = {"DefaultTensorType": 1}  # keeps ORT-optimised BERT-style graphs quantizable (MEASURED trap 5)
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    with quiet_ort():
        quantize_static(
            str(src), str(dst), _reader(calib, inputs),
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            calibrate_method=cal_method, extra_options=extra,
            calibration_cache_path=str(cache) if cache else None,
        )


def quantize_dynamic_file(src: Path, dst: Path, *, per_channel: bool, reduce_range: bool, op_types=None,
                          nodes_to_exclude=()) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_ort():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types) if op_types else None,
                         per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(nodes_to_exclude) or None, extra_options={"DefaultTensorType": 1})


def convert_fp16_file(src: Path, dst: Path, nodes_to_exclude=()) -> None:
    """FP16 weights and compute, FP32 inputs and outputs (so callers feed what they fed before)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    with quiet_ort():
        m16 = convert_float_to_float16(m, keep_io_types=True, node_block_list=list(nodes_to_exclude) or None)
    onnx.save(m16, str(dst))


def matmul_weight_nodes(model) -> list[str]:
    """MatMul nodes whose second input is a constant 2-D weight (what MatMulNBits can take)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def quantize_nbits_file(src: Path, dst: Path, *, bits: int, block_size: int, symmetric: bool,
                        accuracy_level: int | None, nodes_to_exclude=()) -> None:
    """INT4 or INT8 weights (``bits``) of every MatMul with a constant 2-D weight: MatMulNBits, blocked scales.

    Activations are not quantized ahead of time: on an external MiniLM, INT8 weights kept min cosine
    0.997 (block 128) where dynamic INT8 kept 0.979 and static 0.23 (MEASURED.md). An INT8 model whose
    accuracy level is unset gets INT8_WO_ACCURACY_LEVEL."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(src))
    if bits == 8 and accuracy_level is None:
        accuracy_level = INT8_WO_ACCURACY_LEVEL
    with quiet_ort():
        q = MatMulNBitsQuantizer(m, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=list(nodes_to_exclude))
        q.process()
    onnx.save(q.model.model, str(dst))


def quantized_nodes(path: Path) -> list[str]:
    """Compute nodes of a quantized model that run on quantized tensors, by their float-model names.

    QDQ keeps the original node names (a node fed by DequantizeLinear is quantized); QOperator
    renames them with a ``_quant`` suffix.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    names = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        if n.name.endswith("_quant"):
            names.append(n.name[: -len("_quant")])
        elif n.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
            names.append(n.name)
        elif any(i in dq_out for i in n.input):
            names.append(n.name)
    seen: set[str] = set()
    return [x for x in names if x and not (x in seen or seen.add(x))]



def dynamic_ops(model) -> list[str]:
    """The ops of ``model`` that `auto` quantizes dynamically (DYNAMIC_OPS present in the graph), sorted."""
    return sorted({n.op_type for n in model.graph.node} & set(DYNAMIC_OPS))


# --------------------------------------------------------------------------- the table


@dataclass
class Sources:
    """What a mode's builder reads: the step's input as given, its pre-processed copy, calibration."""

    src: Path  # the step's input model (FP32, self-contained)
    prepped: Path  # ``src`` after ONNX Runtime's quantization pre-processing
    work: Path  # the step's scratch directory (calibration caches)
    inputs: list[InputSpec]
    calib: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Mode:
    """One quantize mode (the config's ``compress.steps[].quantize.mode``)."""

    name: str
    label: Callable  # (QuantizeConfig) -> the candidate's name when the step asks for this mode
    build: Callable  # (Sources, QuantizeConfig, dst Path) -> None: writes the quantized model to dst
    needs_calibration: bool
    applies: Callable  # (onnx.ModelProto) -> why this mode cannot quantize the graph, or None
    record: Callable  # (QuantizeConfig) -> the options report.json lists for a candidate


def _always(model) -> None:
    return None


def _needs_matmul_weights(model) -> str | None:
    if matmul_weight_nodes(model):
        return None
    return "no MatMul with constant weights (MatMulNBits needs them)"


def _build_static(s: Sources, q: QuantizeConfig, dst: Path) -> None:
    quantize_static_file(s.prepped, dst, s.calib, s.inputs, fmt=q.format, per_channel=q.per_channel,
                         reduce_range=q.reduce_range, method=q.calibration.method,
                         nodes_to_exclude=q.nodes_to_exclude, op_types=q.op_types,
                         cache=s.work / f"calib-{q.calibration.method}.json")


def _build_dynamic(s: Sources, q: QuantizeConfig, dst: Path) -> None:
    quantize_dynamic_file(s.prepped, dst, per_channel=q.per_channel, reduce_range=q.reduce_range,
                          op_types=q.op_types, nodes_to_exclude=q.nodes_to_exclude)


def _build_fp16(s: Sources, q: QuantizeConfig, dst: Path) -> None:
    convert_fp16_file(s.src, dst, q.nodes_to_exclude)


def _build_nbits(bits: int):
    def build(s: Sources, q: QuantizeConfig, dst: Path) -> None:
        # the input as given: pre-processing fuses MatMul+Add into Gemm, which MatMulNBits cannot take
        quantize_nbits_file(s.src, dst, bits=bits, block_size=q.block_size, symmetric=q.symmetric,
                            accuracy_level=q.accuracy_level, nodes_to_exclude=q.nodes_to_exclude)
    return build


def _static_record(q: QuantizeConfig) -> dict:
    return {"format": q.format, "per_channel": q.per_channel, "reduce_range": q.reduce_range,
            "calibration": q.calibration.method, "samples": q.calibration.samples, "op_types": q.op_types}


def _weight_only_record(q: QuantizeConfig) -> dict:
    return {"block_size": q.block_size, "symmetric": q.symmetric, "accuracy_level": q.accuracy_level}


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("static", lambda q: f"static {q.format}" + (" per-channel" if q.per_channel else ""),
         _build_static, True, _always, _static_record),
    Mode("dynamic", lambda q: "dynamic" + (" per-channel" if q.per_channel else ""), _build_dynamic, False, _always,
         lambda q: {"per_channel": q.per_channel, "reduce_range": q.reduce_range, "op_types": q.op_types}),
    Mode("fp16", lambda q: "fp16", _build_fp16, False, _always, lambda q: {"keep_io_types": True}),
    Mode("int4_weight_only", lambda q: "int4 weight-only", _build_nbits(4), False, _needs_matmul_weights,
         _weight_only_record),
    Mode("int8_weight_only", lambda q: "int8 weight-only", _build_nbits(8), False, _needs_matmul_weights,
         _weight_only_record),
)}
