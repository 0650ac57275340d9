"""Post-training quantization in ONNX Runtime, chosen by measurement.

Every candidate (static QDQ/QOperator, dynamic, FP16, INT8 and INT4 weight-only) is scored on held-out
data (accuracy, or fidelity to the input model when no labels fit) and timed in ONNX Runtime at
batch 1 side by side with its input. A candidate is kept only when it holds the accuracy budget
and, for the latency objective, is really faster than its input on this machine: INT8 is slower
than FP32 for some models here (MEASURED.md), so nothing is applied blindly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecli.errors import ConfigError, DataError
from edgecli.onnxio import inputs_of, model_inputs  # noqa: F401 - inputs_of: re-exported for callers of this module
from edgecli.runtimes.feeds import InputSpec, fit_problem, load_input_file, n_samples, take  # noqa: F401

# A candidate must beat its input by this much to count as faster: timings here move a few
# percent between rounds, and a tie is not worth the accuracy risk of a quantized model.
MIN_SPEEDUP = 0.03
# Ops ONNX Runtime's dynamic quantizer handles well (weights of MatMul-heavy models). Conv is
# left out in `auto`: dynamic Conv runs as ConvInteger, 7-11x slower than FP32 here.
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU", "EmbedLayerNormalization")
MAX_BACKOFF_TRIES = 8
# INT8 weight-only (MatMulNBits bits=8): accuracy_level 4 computes in int8 with per-block activation
# scales (the VNNI path); the default level dequantizes to FP32 and ran 4x slower than FP32 on MiniLM
# here. `auto` tries block 128 (faster) and the step's block_size (default 32: closer to FP32).
INT8_WO_ACCURACY_LEVEL = 4
INT8_WO_AUTO_BLOCK = 128

_CLASS_NAMES = ("logit", "prob", "score", "class", "label", "pred")
# an unnamed [N, K] output wider than this is read as an embedding (sentence embedders have 128-1024 dims)
MAX_UNNAMED_CLASSES = 32


def output_kind(model, info: dict | None, num_classes: int | None) -> tuple[str, str]:
    """("class_scores" | "embedding", why): what the model's first output is, decided from the output.

    The fidelity metric follows from it, never from whether labels happen to exist: top-1 of a
    384-d embedding means nothing (a static-INT8 MiniLM kept "fidelity" 0.0 at min cosine 0.36 and
    was published). Class scores are a rank-2 output [N, K>=2] that edgecli's metadata names logits,
    whose K equals the data's class count, whose name says so, or whose K is at most 32; anything else
    is compared by cosine.
    """
    names = (info or {}).get("output_names")
    if names == ["embedding"]:
        return "embedding", "the model's metadata names its output 'embedding'"
    out = model.graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in out.type.tensor_type.shape.dim]
    k = dims[-1] if dims else None
    if len(dims) != 2 or k is None or k < 2:
        return "embedding", f"output {out.name} has shape {['N' if d is None else d for d in dims]}, not class scores [N, K]"
    if names == ["logits"]:
        return "class_scores", "the model's metadata names its output 'logits'"
    if num_classes is not None and k == num_classes:
        return "class_scores", f"output {out.name} [N, {k}] matches the data's {num_classes} classes"
    if any(w in out.name.lower() for w in _CLASS_NAMES):
        return "class_scores", f"output {out.name} [N, {k}] is named as class scores"
    if k <= MAX_UNNAMED_CLASSES:
        return "class_scores", f"output {out.name} [N, {k}]: few enough values to be class scores"
    return "embedding", (f"output {out.name} [N, {k}] is wider than {MAX_UNNAMED_CLASSES}, not named as class scores "
                         "and matches no class count: compared by cosine (the stricter reading)")




# --------------------------------------------------------------------------- scoring and timing


class Scorer:
    """Scores a model on fixed inputs: accuracy when labels are known, else fidelity to a reference.

    ``score`` is the number the accuracy budget applies to: accuracy, or top-1 agreement with the
    input model (whose own score is then 1.0).
    """

    def __init__(self, feeds: dict[str, np.ndarray], labels: np.ndarray | None, threads: int, reference=None,
                 embedding: bool = False):
        self.feeds, self.labels, self.threads = feeds, labels, threads
        self.reference = reference
        # an embedding model's fidelity is the worst cosine to the reference (top-1 of a vector means nothing)
        self.embedding = embedding
        self.metric = "accuracy" if labels is not None else ("cosine_min" if embedding else "fidelity")

    def outputs(self, path: Path) -> np.ndarray:
        from edgecli.runtimes.ort import make_session, run_batched

        sess = make_session(path, threads=self.threads)
        names = [i.name for i in sess.get_inputs()]
        fixed_batch = sess.get_inputs()[0].shape[0] == 1
        return run_batched(sess, {k: self.feeds[k] for k in names}, 1 if fixed_batch else 256).astype(np.float32)

    def score(self, path: Path) -> dict:
        from edgecli.metrics import cosine_similarity, top1_agreement

        out = self.outputs(path)
        if not np.isfinite(out).all():
            return {"score": 0.0, "nonfinite_outputs": True}
        if self.labels is not None:
            acc = float((out.reshape(len(out), -1).argmax(-1) == self.labels).mean())
            res = {"score": acc, "accuracy": acc}
        else:
            res = {}
        if self.reference is not None:
            ref = self.reference
            agree = top1_agreement(ref.reshape(len(ref), -1), out.reshape(len(out), -1))
            if ref.reshape(len(ref), -1).shape[1] == 1:  # a scalar regressor: per-sample cosine is only a sign
                cos = cosine_similarity(ref.reshape(1, -1), out.reshape(1, -1))
            else:
                cos = cosine_similarity(ref, out)
            res.update(top1_agreement=agree, cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
            if self.labels is None:
                res["score"] = float(cos.min()) if self.embedding else agree
        return res


def time_p50(paths: list[Path], feed1: dict[str, np.ndarray], threads: int, *, rounds: int = 9,
             round_s: float = 0.08, min_runs: int = 10, sessions: int = 3) -> list[float]:
    """p50 latency in ms of each model at batch 1, measured interleaved (round-robin) so that
    load from other processes hits every model alike; ratios between them are what counts.

    Each model gets ``sessions`` sessions, used in turn round by round: one session's p50 of a
    model can sit 10-20% off another session's of the same file here (where its buffers landed),
    enough to pick a slower candidate; rotating several averages that out.
    """
    from edgecli.runtimes.ort import make_session

    pools = [[make_session(p, threads=threads) for _ in range(sessions)] for p in paths]
    runs = []
    for pool in pools:  # warm-up, and an estimate of how many runs fill one round
        for s in pool:
            for _ in range(5):
                s.run(None, feed1)
        s = pool[0]
        t0 = time.perf_counter()
        for _ in range(5):
            s.run(None, feed1)
        per = (time.perf_counter() - t0) / 5
        runs.append(max(min_runs, min(2000, int(round_s / max(per, 1e-6)))))
    samples: list[list[float]] = [[] for _ in pools]
    for r in range(rounds):
        for i, pool in enumerate(pools):
            s = pool[r % len(pool)]
            for _ in range(runs[i]):
                t0 = time.perf_counter()
                s.run(None, feed1)
                samples[i].append(time.perf_counter() - t0)
    return [statistics.median(x) * 1000.0 for x in samples]


# --------------------------------------------------------------------------- transforms


@contextlib.contextmanager
def _quiet_ort():
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
            with _quiet_ort(), _in_dir(dst.parent):
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
    with _quiet_ort():
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

    with _quiet_ort():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types) if op_types else None,
                         per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(nodes_to_exclude) or None, extra_options={"DefaultTensorType": 1})


def convert_fp16_file(src: Path, dst: Path, nodes_to_exclude=()) -> None:
    """FP16 weights and compute, FP32 inputs and outputs (so callers feed what they fed before)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    with _quiet_ort():
        m16 = convert_float_to_float16(m, keep_io_types=True, node_block_list=list(nodes_to_exclude) or None)
    onnx.save(m16, str(dst))


def matmul_weight_nodes(model) -> list[str]:
    """MatMul nodes whose second input is a constant 2-D weight (what MatMulNBits can take)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def quantize_int4_file(src: Path, dst: Path, *, block_size: int, symmetric: bool, accuracy_level: int | None,
                       nodes_to_exclude=()) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(src))
    with _quiet_ort():
        q = MatMulNBitsQuantizer(m, bits=4, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=list(nodes_to_exclude))
        q.process()
    onnx.save(q.model.model, str(dst))


def quantize_int8_weight_only_file(src: Path, dst: Path, *, block_size: int, symmetric: bool,
                                   accuracy_level: int | None, nodes_to_exclude=()) -> None:
    """INT8 weights of every MatMul with a constant 2-D weight (MatMulNBits bits=8, blocked scales).

    Activations are not quantized ahead of time: on an external MiniLM it kept min cosine 0.997
    (block 128) where dynamic INT8 kept 0.979 and static 0.23 (MEASURED.md)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(src))
    level = INT8_WO_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    with _quiet_ort():
        q = MatMulNBitsQuantizer(m, bits=8, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=level, nodes_to_exclude=list(nodes_to_exclude))
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


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    name: str
    mode: str
    options: dict
    path: Path | None = None
    excluded_nodes: list[str] = field(default_factory=list)
    bytes: int | None = None
    scores: dict = field(default_factory=dict)
    p50_ms: float | None = None
    error: str | None = None
    applicable: bool = True
    chosen: bool = False
    reason: str = ""
    failed: list[str] = field(default_factory=list)  # constraints this candidate broke

    @property
    def score(self) -> float | None:
        return self.scores.get("score")

    def to_json(self, base_score: float | None, base_p50: float | None) -> dict:
        d = {
            "name": self.name, "mode": self.mode, "options": self.options, "excluded_nodes": self.excluded_nodes,
            "bytes": self.bytes, **{k: v for k, v in self.scores.items() if k != "score"},
            "score": self.score, "p50_ms": _r(self.p50_ms),
            "accuracy_drop": _r(base_score - self.score) if base_score is not None and self.score is not None else None,
            "latency_ratio": _r(self.p50_ms / base_p50) if self.p50_ms and base_p50 else None,
            "applicable": self.applicable, "error": self.error,
            "chosen": self.chosen, "failed_constraints": self.failed, "reason": self.reason,
        }
        return d


def _r(x, n=5):
    return None if x is None else round(float(x), n)


@dataclass
class QuantizeOutcome:
    chosen: Candidate | None  # None: the input model is kept
    candidates: list[Candidate]
    input: Candidate
    verdict: str
    failed_constraint: str | None
    sensitivity: list[dict]
    notes: list[str]
    best_rejected: Candidate | None = None


class QuantizeJob:
    """One `quantize` step: build candidates for its mode, score, time, choose.

    ``src`` is the step's input model (FP32 ONNX, self-contained); ``work`` a scratch directory.
    """

    def __init__(self, src: Path, work: Path, opts, *, scorer: Scorer, calib: dict[str, np.ndarray] | None,
                 calib_problem: str | None, feed1: dict[str, np.ndarray], threads: int,
                 max_drop: float | None, objective: str, key: str, log=lambda m: None,
                 min_cosine: float | None = None):
        self.src, self.work, self.opts = Path(src), Path(work), opts
        # the guard: min_cosine for embeddings/regressors (score is the worst cosine), else max_drop
        self.min_cosine = min_cosine if scorer.embedding else None
        self.scorer, self.calib, self.calib_problem = scorer, calib, calib_problem
        self.feed1, self.threads, self.max_drop, self.objective = feed1, threads, max_drop, objective
        self.key, self.log = key, log
        self.notes: list[str] = []
        self.sensitivity: list[dict] = []
        self._n = 0

    # ----------------------------------------------------------------- building
    def _new_path(self, tag: str) -> Path:
        self._n += 1
        return self.work / f"cand{self._n:02d}-{tag}.onnx"

    def _build(self, cand: Candidate, prepped: Path) -> Candidate:
        o = cand.options
        dst = self._new_path(cand.mode)
        try:
            if cand.mode == "static":
                if self.calib is None:
                    raise DataError(self.calib_problem or f"{self.key}.calibration.data: no calibration data")
                quantize_static_file(prepped, dst, self.calib, self.inputs, fmt=o["format"], per_channel=o["per_channel"],
                                     reduce_range=o["reduce_range"], method=o["calibration"],
                                     nodes_to_exclude=cand.excluded_nodes, op_types=o.get("op_types"),
                                     cache=self.work / f"calib-{o['calibration']}.json")
            elif cand.mode == "dynamic":
                quantize_dynamic_file(prepped, dst, per_channel=o["per_channel"], reduce_range=o["reduce_range"],
                                      op_types=o.get("op_types"), nodes_to_exclude=cand.excluded_nodes)
            elif cand.mode == "fp16":
                convert_fp16_file(self.src, dst, cand.excluded_nodes)
            elif cand.mode == "int4_weight_only":
                # the input as given: pre-processing fuses MatMul+Add into Gemm, which MatMulNBits cannot take
                quantize_int4_file(self.src, dst, block_size=o["block_size"], symmetric=o["symmetric"],
                                   accuracy_level=o.get("accuracy_level"), nodes_to_exclude=cand.excluded_nodes)
            elif cand.mode == "int8_weight_only":
                quantize_int8_weight_only_file(self.src, dst, block_size=o["block_size"], symmetric=o["symmetric"],
                                               accuracy_level=o.get("accuracy_level"),
                                               nodes_to_exclude=cand.excluded_nodes)
            cand.path = dst
            from edgecli.onnxio import model_bytes

            cand.bytes = model_bytes(dst)
            cand.scores = self.scorer.score(dst)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a mode that fails on this graph is reported, not fatal
            cand.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            cand.reason = f"failed to build: {cand.error}"
            cand.path = None
        return cand

    def _drop(self, cand: Candidate) -> float | None:
        if cand.score is None or self.base.score is None:
            return None
        return self.base.score - cand.score

    @property
    def guard(self) -> tuple[str, float] | None:
        if self.min_cosine is not None:
            return "min_cosine", self.min_cosine
        return ("max_accuracy_drop", self.max_drop) if self.max_drop is not None else None

    def _holds(self, cand: Candidate) -> bool:
        if self.min_cosine is not None:
            return cand.score is not None and cand.score >= self.min_cosine - 1e-9
        d = self._drop(cand)
        return d is not None and (self.max_drop is None or d <= self.max_drop + 1e-9)

    def _guard_reason(self, cand: Candidate) -> str:
        if cand.score is None:
            return "not scored"
        if self.min_cosine is not None:
            return f"min cosine {cand.score:.4f} < min_cosine {self.min_cosine} (guard)"
        return f"{self.scorer.metric} drop {self._drop(cand):.4f} > max_accuracy_drop {self.max_drop} (guard)"

    # ----------------------------------------------------------------- plan
    def _plan(self, model) -> list[Candidate]:
        o = self.opts
        static_opts = {"format": o.format, "per_channel": o.per_channel, "reduce_range": o.reduce_range,
                       "calibration": o.calibration.method, "samples": o.calibration.samples, "op_types": o.op_types}
        has_matmul_w = bool(matmul_weight_nodes(model))
        dyn_ops = sorted({n.op_type for n in model.graph.node} & set(DYNAMIC_OPS))
        int4_opts = {"block_size": o.block_size, "symmetric": o.symmetric, "accuracy_level": o.accuracy_level}
        excl = list(o.nodes_to_exclude)
        mk = lambda name, mode, opts: Candidate(name, mode, opts, excluded_nodes=list(excl))  # noqa: E731
        if o.mode == "static":
            return [mk(f"static {o.format}" + (" per-channel" if o.per_channel else ""), "static", static_opts)]
        if o.mode == "dynamic":
            return [mk("dynamic" + (" per-channel" if o.per_channel else ""), "dynamic",
                       {"per_channel": o.per_channel, "reduce_range": o.reduce_range, "op_types": o.op_types})]
        if o.mode == "fp16":
            return [mk("fp16", "fp16", {"keep_io_types": True})]
        if o.mode in ("int4_weight_only", "int8_weight_only"):
            c = mk(o.mode.replace("_weight_only", " weight-only"), o.mode, int4_opts)
            if not has_matmul_w:
                c.applicable, c.reason = False, "not applicable: no MatMul with constant weights (MatMulNBits needs them)"
            return [c]
        # auto: every mode that applies to this graph; each is measured, none assumed
        cands = [
            mk("static qdq per-channel", "static", {**static_opts, "format": "qdq", "per_channel": True}),
            mk("static qdq per-tensor", "static", {**static_opts, "format": "qdq", "per_channel": False}),
        ]
        if o.format == "qoperator":
            cands.append(mk("static qoperator", "static", {**static_opts, "format": "qoperator"}))
        if dyn_ops:
            c = mk("dynamic " + "/".join(dyn_ops), "dynamic",
                   {"per_channel": True, "reduce_range": o.reduce_range, "op_types": o.op_types or dyn_ops})
            cands.append(c)
        else:
            c = mk("dynamic", "dynamic", {})
            c.applicable, c.reason = False, "not tried: no MatMul/Gemm/RNN/attention ops (dynamic Conv runs as ConvInteger, 7-11x slower here)"
            cands.append(c)
        cands.append(mk("fp16", "fp16", {"keep_io_types": True}))
        c = mk("int4 weight-only", "int4_weight_only", int4_opts)
        if not has_matmul_w:
            c.applicable, c.reason = False, "not tried: no MatMul with constant weights (MatMulNBits needs them)"
        cands.append(c)
        cands += self._int8_weight_only_plan(int4_opts, has_matmul_w, mk)
        return cands

    def _int8_weight_only_plan(self, int4_opts: dict, has_matmul_w: bool, mk) -> list[Candidate]:
        """`auto`'s INT8 weight-only candidates: block 128 (faster) and the step's block_size (closer to FP32)."""
        out = []
        for block in sorted({INT8_WO_AUTO_BLOCK, self.opts.block_size}, reverse=True):
            c = mk(f"int8 weight-only block {block}", "int8_weight_only", {**int4_opts, "block_size": block})
            if not has_matmul_w:
                c.applicable, c.reason = False, "not tried: no MatMul with constant weights (MatMulNBits needs them)"
            out.append(c)
        return out

    # ----------------------------------------------------------------- backoff
    def _backoff(self, first: Candidate, prepped: Path) -> list[Candidate]:
        """Sensitivity pass: re-quantize with each quantized node left in FP32, rank the nodes by
        the score that brings back, then exclude the worst ones cumulatively until the budget holds.

        Under ``objective: size`` the nodes that bring score back are ranked by score per byte they
        add instead: MiniLM's embedding table brings back most cosine but costs 35 MB in FP32, while
        an FFN MatMul brings back almost as much for 1.8 MB. Latency is not known per probe (timing
        each would be slow and noisy), so under ``objective: latency`` the rank is the score alone."""
        nodes = [n for n in quantized_nodes(first.path) if n not in first.excluded_nodes]
        if not nodes:
            return []
        self.log(f"sensitivity pass over {len(nodes)} quantized nodes")
        gains = []
        for n in nodes:
            probe = Candidate(f"probe {n}", first.mode, first.options, excluded_nodes=first.excluded_nodes + [n])
            self._build(probe, prepped)
            if probe.path is None:
                continue
            gains.append((probe.score, n, probe.bytes - first.bytes))
            with contextlib.suppress(OSError):
                probe.path.unlink()

        def rank(t):
            gain, extra = t[0] - first.score, t[2]
            if self.objective == "size":
                return (0, -gain / max(extra, 1024)) if gain > 0 else (1, -gain)
            return (0, -gain)

        gains.sort(key=rank)
        self.sensitivity = [{"node": n, "score_when_kept_fp32": _r(s), "gain": _r(s - first.score), "extra_bytes": b}
                            for s, n, b in gains]
        ranked = [n for _, n, _ in gains]
        out = []
        k, tries = 1, 0
        while k < len(ranked) + 1 and tries < MAX_BACKOFF_TRIES:
            excl = first.excluded_nodes + ranked[:k]
            c = Candidate(f"{first.name} -{k} node{'s' if k > 1 else ''}", first.mode, first.options, excluded_nodes=excl)
            self._build(c, prepped)
            out.append(c)
            tries += 1
            if c.path is not None and self._holds(c):
                break
            k = k + 1 if k < 4 else int(k * 1.5)
        return out

    # ----------------------------------------------------------------- run
    def run(self) -> QuantizeOutcome:
        import onnx

        from edgecli.onnxio import model_bytes

        model = onnx.load(str(self.src))
        self.inputs = model_inputs(model)
        self.base = Candidate("input (fp32)", "fp32", {}, path=self.src, bytes=model_bytes(self.src))
        self.base.scores = self.scorer.score(self.src)
        prepped = self.work / "preprocessed.onnx"
        self.notes += pre_process(self.src, prepped)
        cands = self._plan(model)
        for c in cands:
            if c.applicable:
                self.log(f"building candidate: {c.name}")
                self._build(c, prepped)
        built = [c for c in cands if c.path is not None]
        # accuracy-aware: if no INT8 candidate holds the budget, back off the first one (static
        # first) by leaving its most sensitive nodes in FP32
        # the INT8 candidate closest to the guard is backed off (static first on a tie): on an external
        # MiniLM static INT8 kept min cosine 0.36 while dynamic kept 0.98, one sensitive node short of 0.99
        int8 = [c for c in built if c.mode == "static"] + [c for c in built if c.mode == "dynamic"]
        # an INT8 weight-only candidate that holds the guard already is an INT8 model that holds it
        holds8 = any(self._holds(c) for c in int8 + [c for c in built if c.mode == "int8_weight_only"])
        if self.guard is not None and int8 and not holds8:
            first = max(int8, key=lambda c: c.score if c.score is not None else float("-inf"))
            cands += self._backoff(first, prepped)
            built = [c for c in cands if c.path is not None]
        # latency-aware: time every built candidate side by side with the input
        self.log(f"timing {len(built) + 1} models at batch 1, {self.threads} thread(s)")
        p50s = time_p50([self.src] + [c.path for c in built], self.feed1, self.threads)
        self.base.p50_ms = p50s[0]
        for c, p in zip(built, p50s[1:], strict=False):
            c.p50_ms = p
        return self._choose(cands)

    def _choose(self, cands: list[Candidate]) -> QuantizeOutcome:
        forced = bool(self.opts.force) and self.opts.mode != "auto"
        base = self.base
        guard = self.guard[0] if self.guard else "max_accuracy_drop"
        ok: list[Candidate] = []
        for c in cands:
            if c.path is None:
                continue
            if not self._holds(c):
                c.failed.append(guard)
                c.reason = self._guard_reason(c)
                if not forced:
                    continue
                c.reason += "; kept: force: true"
            slower = c.p50_ms >= base.p50_ms * (1 - MIN_SPEEDUP)
            if self.objective == "latency" and slower and not forced:
                c.failed.append("latency")
                c.reason = (f"not faster than its input ({c.p50_ms:.4f} vs {base.p50_ms:.4f} ms, "
                            f"{c.p50_ms / base.p50_ms:.2f}x; needs < {1 - MIN_SPEEDUP:.2f}x)")
                continue
            if self.objective == "size" and c.bytes >= base.bytes:
                c.failed.append("size")
                c.reason = f"not smaller than its input ({c.bytes} vs {base.bytes} bytes)"
                continue
            ok.append(c)
        key = (lambda c: (c.p50_ms, c.bytes)) if self.objective == "latency" else (lambda c: (c.bytes, c.p50_ms))
        ok.sort(key=key)
        chosen = ok[0] if ok else None
        for c in ok[1:]:
            c.reason = (f"holds every constraint but {chosen.name} is "
                        + (f"faster ({chosen.p50_ms:.4f} vs {c.p50_ms:.4f} ms)" if self.objective == "latency"
                           else f"smaller ({chosen.bytes} vs {c.bytes} bytes)"))
        failed_constraint = None
        best_rejected = None
        if chosen is not None:
            chosen.chosen = True
            ratio = chosen.p50_ms / base.p50_ms
            held = (f"min cosine {chosen.score:.4f}" if self.min_cosine is not None
                    else f"{self.scorer.metric} drop {self._drop(chosen):.4f}")
            chosen.reason = (f"best by {self.objective}: {ratio:.2f}x input latency, "
                             f"{chosen.bytes / base.bytes:.2f}x size, {held}")
            if forced and self.objective == "latency" and chosen.p50_ms >= base.p50_ms * (1 - MIN_SPEEDUP):
                chosen.reason += f" (forced: mode {self.opts.mode} kept although it is not faster than its input)"
            verdict = f"chose {chosen.name}"
        else:
            tried = [c for c in cands if c.path is not None]
            fails = [f for c in tried for f in c.failed]
            if not tried:
                failed_constraint = "no candidate could be built"
            elif all(guard in c.failed for c in tried):
                failed_constraint = guard
            else:
                failed_constraint = max(set(fails), key=fails.count) if fails else "none"
            verdict = f"kept FP32 input: no candidate held {failed_constraint}"
            if tried:
                best_rejected = max(tried, key=lambda c: (c.score or 0.0, -(c.p50_ms or 0)))
        return QuantizeOutcome(chosen, cands, base, verdict, failed_constraint, self.sensitivity, self.notes,
                               best_rejected)


def check_options(opts, key: str) -> None:
    """Cross-field rules of one quantize step that the schema cannot say alone."""
    if opts.mode in ("int4_weight_only", "int8_weight_only", "auto") and opts.block_size & (opts.block_size - 1):
        raise ConfigError(f"{key}.block_size: must be a power of two >= 16 (got {opts.block_size})")
    if opts.format == "qoperator" and opts.mode not in ("static", "auto"):
        raise ConfigError(f"{key}.format: qoperator applies to static quantization only (mode is {opts.mode})")


# --------------------------------------------------------------------------- transformer fusion

FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def transformer_dims(model_info: dict | None, num_heads: int | None, hidden_size: int | None) -> tuple[int, int, str]:
    """(num_heads, hidden_size, source) for ONNX Runtime's BERT optimizer.

    Given values win; else the pretrained model's config.json (model.args.model_dir or the packaged
    MiniLM). ORT's own detection fails on TorchScript exports and then silently leaves Attention
    unfused, so they are never left to it.
    """
    if num_heads and hidden_size:
        return int(num_heads), int(hidden_size), "compress.num_heads/hidden_size"
    info = model_info or {}
    arch = str(info.get("arch", ""))
    if info.get("kind") != "text" and "minilm" not in arch.lower():
        raise ConfigError("compress.transformer_optimize: set compress.num_heads and compress.hidden_size "
                          "(this model does not say which transformer it is)")
    import json as _json

    from edgecli.data.text import resolve_model_dir

    try:
        d = resolve_model_dir((info.get("args") or {}).get("model_dir"))
        conf = _json.loads((d / "config.json").read_text())
        heads, hidden = int(conf["num_attention_heads"]), int(conf["hidden_size"])
    except (DataError, OSError, KeyError, ValueError) as e:
        raise ConfigError(f"compress.transformer_optimize: cannot read the encoder's heads and hidden size "
                          f"({getattr(e, 'message', e)}); set compress.num_heads and compress.hidden_size") from None
    return int(num_heads or heads), int(hidden_size or hidden), f"{d.name}/config.json"


def transformer_fuse(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse a BERT-style FP32 graph (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm) into dst.

    Must run before quantization: the fused kernels are what make INT8 pay, and fusing an
    already-quantized graph finds nothing (MatMulInteger breaks the patterns). Returns the count
    of each fused op in the result.
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_ort():
        m = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
        m.save_model_to_file(str(dst))
    g = onnx.load(str(dst), load_external_data=False).graph
    counts: dict[str, int] = {}
    for n in g.node:
        if n.op_type in FUSED_OPS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
