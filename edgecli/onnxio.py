"""torch -> ONNX export, guarded ONNX loading, parity checks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from edgecli.errors import CheckFailed, ConfigError, ModelFileError
from edgecli.runtimes.feeds import InputSpec

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's warnings and logs off the terminal (they show with -v / EDGECLI_VERBOSE)."""
    if os.environ.get("EDGECLI_VERBOSE"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def export_onnx(model, example_inputs: tuple, path: Path, *, opset: int = 17,
                input_names=(INPUT_NAME,), output_names=(OUTPUT_NAME,), dynamic_axes: dict | None = None) -> Path:
    """Export ``model`` (eval mode) with a dynamic batch axis and weights inside the file.

    Uses the TorchScript exporter: 0.1 s instead of 4-6 s for the dynamo exporter on these
    models, it writes opset 17 (dynamo silently writes 18), and ONNX Runtime's transformer
    optimizer recognises its graphs (MEASURED.md). The dynamo exporter is the fallback.
    """
    import torch

    model.eval()
    path = Path(path)
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    with quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                model, example_inputs, str(path), dynamo=False, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        except Exception:  # noqa: BLE001 - fall back to the dynamo exporter for graphs TorchScript cannot trace
            dims = {name: {0: torch.export.Dim("batch", min=1)} for name in input_names}
            torch.onnx.export(
                model, example_inputs, str(path), dynamo=True, opset_version=max(opset, 18),
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=tuple(dims[n] for n in input_names), external_data=False, verbose=False,
            )
    return path


def model_bytes(path: Path) -> int:
    """Size of an ONNX model including any external data files next to it."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    seen = set()
    for t in _external_tensors(m):
        loc = dict((e.key, e.value) for e in t.external_data).get("location")
        if loc and loc not in seen:
            seen.add(loc)
            p = path.parent / loc
            if p.is_file():
                total += p.stat().st_size
    return total


def model_files(path: Path) -> list[Path]:
    """An ONNX file and the external-data files it names (what a stage reading it declares)."""
    m = load_onnx(path, load_external=False)
    locs = sorted({dict((e.key, e.value) for e in t.external_data).get("location", "") for t in _external_tensors(m)})
    return [Path(path)] + [Path(path).parent / loc for loc in locs if loc]


def _graph_tensors(g):
    """Every TensorProto a graph holds: initializers, sparse initializers (values and indices), node
    attributes (tensors, sparse tensors) and, recursively, subgraphs. onnx's own helper misses sparse ones."""
    yield from g.initializer
    for sp in g.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in g.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attrs):
    for a in attrs:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        for sp in a.sparse_tensors:
            yield sp.values
            yield sp.indices
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for sub in a.graphs:
            yield from _graph_tensors(sub)


def _all_tensors(m):
    yield from _graph_tensors(m.graph)
    for fn in m.functions:
        for node in fn.node:
            yield from _attribute_tensors(node.attribute)


def _external_tensors(m):
    for t in _all_tensors(m):
        if t.HasField("data_location") and t.data_location == 1:  # TensorProto.EXTERNAL
            yield t


def check_external_data(m, model_path: Path) -> None:
    """Refuse external data whose location escapes the model's directory (before reading it).

    The directory is the one ONNX Runtime reads from: beside the path it is given (a symlinked
    model.onnx does not move its data to the link's target). The data file itself, and every folder
    between, must be real (no link), and a regular file.
    """
    import stat

    base = Path(os.path.abspath(model_path)).parent
    real_base = base.resolve()
    for t in _external_tensors(m):
        loc = dict((e.key, e.value) for e in t.external_data).get("location", "")
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in Path(loc).parts or "\0" in loc:
            raise ModelFileError(f"{model_path}: external data location {loc!r} escapes the model's directory; refused")
        target = base / loc
        if real_base not in target.resolve().parents:
            raise ModelFileError(f"{model_path}: external data {loc!r} resolves outside the model's directory; refused")
        p = base
        for part in Path(loc).parts:
            p = p / part
            if p.is_symlink():
                raise ModelFileError(f"{model_path}: external data {loc!r} is reached through a symbolic link; refused")
        try:
            st = os.stat(target)
        except OSError:
            raise ModelFileError(f"{model_path}: external data file {loc!r} is missing (beside {base})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{model_path}: external data {loc!r} is not a regular file; refused")


def load_onnx(path: str | Path, *, load_external: bool = True):
    """Load an ONNX model safely: clear errors for missing, truncated, non-ONNX or escaping files."""
    import onnx

    from edgecli.safeio import open_user_file

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file (a directory, FIFO or device); refused")
    with open_user_file(path, "an ONNX model", 1 << 62, ModelFileError) as f:  # never blocks on a FIFO
        try:
            head = f.read(64)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise ModelFileError(f"{path}: empty file, not an ONNX model")
    if head.startswith(b"version https://git-lfs"):
        raise ModelFileError(f"{path}: is a Git LFS pointer, not the model; run `git lfs pull`")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends
        raise ModelFileError(f"{path}: not a valid ONNX model (truncated or corrupt: {type(e).__name__})") from None
    if not m.graph.node and not m.graph.output:
        raise ModelFileError(f"{path}: not a valid ONNX model (empty graph)")
    check_external_data(m, path)
    if load_external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(m, str(Path(os.path.abspath(path)).parent))  # where ORT looks too
        except Exception as e:
            raise ModelFileError(f"{path}: cannot read external data ({type(e).__name__}: {e})") from None
    return m


def parity(ref: np.ndarray, got: np.ndarray, atol: float | None = None, what: str | None = None, *,
           labels: np.ndarray | None = None) -> dict:
    """Compare two output arrays: max abs diff, top-1 agreement (class scores: 2-D, more than one
    column) and, with ``labels``, both accuracies. With ``what``, a check: CheckFailed beyond ``atol``
    or below 100% top-1 agreement."""
    from edgecli.metrics import max_abs_diff, top1_agreement

    diff = max_abs_diff(ref, got)
    res = {"max_abs_diff": diff, "samples": int(len(ref))}
    if ref.ndim == 2 and ref.shape[1] > 1:
        res["top1_agreement"] = top1_agreement(ref, got)
        if labels is not None:
            a_in = float(np.mean(ref.argmax(1) == labels))
            a_out = float(np.mean(got.argmax(1) == labels))
            res.update(input_accuracy=a_in, export_accuracy=a_out, accuracy_delta=a_out - a_in)
    if what is None:
        return res
    agree = res.get("top1_agreement", 1.0)
    res.update(atol=atol, passed=True)
    if not (diff <= atol and agree == 1.0):
        res["passed"] = False
        raise CheckFailed(
            f"{what}: ONNX output differs from PyTorch (max abs diff {diff:.3g} > atol {atol:g} "
            f"or top-1 agreement {agree:.4f} < 1); nothing was published"
        )
    return res


def parity_samples(cfg, info: dict | None, inputs, n: int) -> tuple[dict, np.ndarray | None, str]:
    """(feeds, labels or None, source) to compare a model with its conversion on: the pipeline's test split
    through the model's own preprocessing, else seeded random inputs (``cfg.seed``)."""
    from edgecli.errors import DataError
    from edgecli.runtimes.feeds import fit_problem, synthetic_feeds

    problem = None
    if info and info.get("preprocess"):
        try:
            from edgecli.data import load_splits
            from edgecli.data.preprocess import PreprocessSpec

            splits = load_splits(cfg)
            spec = PreprocessSpec.from_dict(info["preprocess"])
            raw, y = splits.test.raw[:n], splits.test.y[:n]
            x = spec.apply(raw)
            feeds = x if isinstance(x, dict) else {inputs[0].name: x}
            for spec_in in inputs:
                if spec_in.name not in feeds:
                    problem = f"no data for model input {spec_in.name}"
                    break
                problem = fit_problem(feeds[spec_in.name], spec_in)
                if problem:
                    break
            if problem is None:
                feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in {i.name for i in inputs}}
                return feeds, np.asarray(y), f"test split ({len(y)} samples)"
        except DataError as e:
            problem = e.message
    feeds = synthetic_feeds(inputs, n, np.random.default_rng(cfg.seed), int_high=100)
    why = f" ({problem})" if problem else ""
    return feeds, None, f"seeded random inputs ({n} samples){why}"


def set_metadata(path: Path, props: dict[str, object]) -> None:
    """Write ``props`` into the model's metadata_props (values JSON-encoded unless str)."""
    import json

    import onnx

    m = onnx.load(str(path))
    existing = {p.key: p for p in m.metadata_props}
    for k, v in props.items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if k in existing:
            existing[k].value = text
        else:
            entry = m.metadata_props.add()
            entry.key, entry.value = k, text
    m.producer_name = "edgecli"
    onnx.save(m, str(path))


def get_metadata(model_or_path) -> dict[str, str]:
    import onnx

    m = model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_onnx(model_or_path, load_external=False)
    return {p.key: p.value for p in m.metadata_props}


def model_info_from_onnx(path: Path) -> dict | None:
    """edgecli's model description (preprocessing, labels, inputs) stored in a model's metadata."""
    return parse_model_info(get_metadata(path).get("edgecli.model_info"), f"{path}")


def parse_model_info(text: str | None, where: str) -> dict | None:
    """The ``edgecli.model_info`` metadata of a model: None when absent, else a checked object.

    It is data from a file: malformed JSON, a non-object, or fields of the wrong type are a one-line
    ModelFileError naming the model, not a traceback in whichever stage reads it first.
    """
    import json

    if not text:
        return None
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise ModelFileError(f"{where}: edgecli.model_info metadata is not valid JSON") from None
    if not isinstance(info, dict):
        raise ModelFileError(f"{where}: edgecli.model_info metadata is not a JSON object")
    checks = {"arch": str, "kind": str, "preprocess": dict, "class_names": list, "input_names": list,
              "args": dict, "input_shape": list, "tokenizer": dict}
    for key, typ in checks.items():
        if info.get(key) is not None and not isinstance(info[key], typ):
            raise ModelFileError(f"{where}: edgecli.model_info field {key!r} is not a {typ.__name__}")
    n = info.get("num_classes")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ModelFileError(f"{where}: edgecli.model_info field 'num_classes' is not a positive integer")
    shape = info.get("input_shape")
    if shape is not None and not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ModelFileError(f"{where}: edgecli.model_info field 'input_shape' is not a list of positive integers")
    if info.get("preprocess") is not None:
        from edgecli.data.preprocess import PreprocessSpec
        from edgecli.errors import DataError

        try:
            PreprocessSpec.from_dict(info["preprocess"])
        except DataError as e:
            raise ModelFileError(f"{where}: edgecli.model_info: {e.message}") from None
    return info


def save_model_files(w_dir: Path, model, cfg, info: dict, x_check, opset: int, atol: float, what: str) -> dict:
    """Export and check: weights.safetensors + model.onnx (with metadata, ``cfg.name`` as the pipeline),
    and the ONNX Runtime vs PyTorch parity numbers (CheckFailed beyond ``atol``)."""
    import torch
    from safetensors.torch import save_file

    from edgecli import __version__
    from edgecli.runtimes.ort import make_session, run_batched
    from edgecli.training import predict_logits

    model = model.cpu().eval()
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(w_dir / "weights.safetensors"))
    io = getattr(model, "onnx_io", None)
    if io:
        spec = io()
        export_onnx(model, spec["example_inputs"], w_dir / "model.onnx", opset=opset,
                    input_names=spec["input_names"], output_names=spec["output_names"], dynamic_axes=spec.get("dynamic_axes"))
    else:
        example = torch.as_tensor(x_check[:1])
        export_onnx(model, (example,), w_dir / "model.onnx", opset=opset)
    set_metadata(w_dir / "model.onnx", {"edgecli.model_info": info, "edgecli.version": __version__,
                                         "edgecli.pipeline": cfg.name})
    sess = make_session(w_dir / "model.onnx", threads=1)
    ref = predict_logits(model, x_check)
    got = run_batched(sess, x_check)
    return parity(ref, got, atol, what)


# --------------------------------------------------------------------------- graph work (export)

# ops whose presence means the model computes in reduced precision: parity is judged by top-1
# agreement and accuracy delta there, since offline fusion (QDQ -> QLinearConv) changes rounding
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
             "DynamicQuantizeLinear", "MatMulNBits", "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul",
             "QAttention", "QGemm", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid"}
TWO_GB = 2**31


def opset_of(m) -> int:
    """The model's default-domain (ai.onnx) opset; 0 when it declares none."""
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def convert_opset(m, target: int | None):
    """Convert the default-domain opset to ``target``; a ConfigError when ONNX cannot."""
    import onnx
    from onnx import version_converter

    cur = opset_of(m)
    if target is None or target == cur:
        return m
    try:
        out = version_converter.convert_version(m, target)
        onnx.checker.check_model(out)
    except Exception as e:  # the converter raises bare RuntimeErrors for unsupported adapters
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"export.opset: cannot convert this model from opset {cur} to {target} ({msg})",
                          hint=f"use export.opset: {cur} (the input's opset) or leave it unset") from None
    return out


def dedupe_initializers(m) -> int:
    """Merge initializers with identical dtype, shape and bytes; return how many were removed."""
    from onnx import numpy_helper

    graph_io = {v.name for v in m.graph.input} | {v.name for v in m.graph.output}
    canon: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for t in m.graph.initializer:
        if t.name in graph_io or t.data_location == 1:  # overridable inputs / external data stay as they are
            continue
        arr = numpy_helper.to_array(t)
        key = (t.data_type, tuple(t.dims), hashlib.sha256(arr.tobytes()).hexdigest())
        if key in canon:
            rename[t.name] = canon[key]
        else:
            canon[key] = t.name
    if not rename:
        return 0

    def fix(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    fix(attr.g)
                for g in attr.graphs:
                    fix(g)

    fix(m.graph)
    keep = [t for t in m.graph.initializer if t.name not in rename]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    vi = [v for v in m.graph.value_info if v.name not in rename]
    del m.graph.value_info[:]
    m.graph.value_info.extend(vi)
    return len(rename)


def _used_domains(graph, out: set[str]) -> None:
    for node in graph.node:
        out.add(node.domain or "")
        for attr in node.attribute:
            if attr.HasField("g"):
                _used_domains(attr.g, out)
            for g in attr.graphs:
                _used_domains(g, out)


def drop_unused_opsets(m) -> list[str]:
    """Remove opset imports no node uses; return their domains.

    ONNX Runtime's optimised model declares every domain it knows (training, nchwc, aten...):
    a deployer reading the model, or a minimal build, should see only what the graph needs.
    """
    used: set[str] = set()
    _used_domains(m.graph, used)
    for f in m.functions:
        used.add(f.domain)
        for node in f.node:
            used.add(node.domain or "")
    keep = [o for o in m.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    dropped = [o.domain for o in m.opset_import if o not in keep]
    if dropped:
        del m.opset_import[:]
        m.opset_import.extend(keep)
    return dropped


def prepare_export(src_model, work: Path, opset: int | None, level: str | None, meta: dict) -> tuple[Path, dict]:
    """Opset, ORT optimisation at ``level``, de-duplication, metadata ``meta``: one candidate model.onnx
    for export in ``work``; returns (its path, notes)."""
    import onnx

    from edgecli import __version__
    from edgecli.runtimes.ort import optimize_offline

    notes = {}
    m = convert_opset(src_model, opset)
    stage_in = work / "converted.onnx"
    save_model(m, stage_in)
    if level:
        opt = work / f"optimized-{level}.onnx"
        optimize_offline(stage_in, opt, level)
        m = onnx.load(str(opt))
    notes["deduplicated_initializers"] = dedupe_initializers(m)
    drop_unused_opsets(m)
    del m.metadata_props[:]
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "edgecli"
    m.producer_version = __version__
    out = work / f"model-{level or 'none'}.onnx"
    save_model(m, out)
    return out, notes


def tensor_bytes(m) -> int:
    return sum(len(t.raw_data) or 0 for t in m.graph.initializer)


def save_model(m, path: Path) -> None:
    """Weights inside the file; external data (beside it) only when protobuf's 2 GB limit forces it."""
    import onnx

    if tensor_bytes(m) > TWO_GB - (64 << 20):
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(m, str(path))


def full_check(path: Path) -> None:
    """The full ONNX checker on a saved model; CheckFailed ("nothing was published") when it fails."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckFailed(f"export: the exported model fails the ONNX checker ({msg}); nothing was published") from None


def batch_dynamic(m) -> bool | None:
    """Whether the first real input's first dimension is symbolic (None when it has no dims)."""
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            return None
        return not (dims[0].HasField("dim_value") and dims[0].dim_value > 0)
    return None


def is_quantized(m) -> bool:
    """Whether the model computes in reduced precision (quantized ops or FP16 weights)."""
    from onnx import TensorProto

    if any(n.op_type in QUANT_OPS for n in m.graph.node):
        return True
    return any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)


def io_desc(vi) -> dict:
    """name, shape (ints; dim names or None for symbolic dims) and numpy dtype name of a graph input/output."""
    from onnx import helper

    tt = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim]
    return {"name": vi.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name
            if tt.elem_type else None}


# --------------------------------------------------------------------------- model inputs

# ONNX TensorProto element types -> numpy (symbolic dims and unknown types read as float32)
_ONNX_TO_NP = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64, 9: np.bool_, 2: np.uint8, 3: np.int8}


def model_inputs(model) -> list[InputSpec]:
    """The real inputs of an ONNX model (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        out.append(InputSpec(vi.name, shape, _ONNX_TO_NP.get(tt.elem_type, np.float32)))
    return out


def inputs_of(path: Path) -> list[InputSpec]:
    """The real inputs of the ONNX file ``path`` (guarded load, external data not read)."""
    return model_inputs(load_onnx(path, load_external=False))


# --------------------------------------------------------------------------- untrusted models

# Run in a child interpreter: a model that makes ONNX Runtime die of a signal (or loop, or print
# on stdout) takes the child down, never the edgecli process or its --json output.
PROBE_PRELUDE = r"""
import contextlib, json, math, os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
with contextlib.suppress(Exception):  # die with the parent (Linux): a killed edgecli leaves no probe behind
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get("EDGECLI_PARENT_PID", os.getppid())):
        os._exit(1)
out = sys.stdout
sys.stdout = sys.stderr  # ONNX Runtime prints provider fallbacks with print()
def verdict(**kw):
    out.write(json.dumps(kw) + "\n"); out.flush()
"""
_PROBE_CHILD = PROBE_PRELUDE + r"""
try:
    from edgecli.errors import EdgeError
    from edgecli.onnxio import load_onnx
    from edgecli.runtimes.feeds import synthetic_input
    from edgecli.runtimes.ort import ORT_DTYPES, make_session
    path = sys.argv[1]
    if not path.lower().endswith(".ort"):  # an .ort file is a flatbuffer: only ONNX Runtime reads it
        load_onnx(path, load_external=False)
    sess = make_session(path, threads=1)
    if not sess.get_inputs():
        raise EdgeError("the model has no inputs; nothing could be fed to it")
    feeds, skipped = {}, []
    for i in sess.get_inputs():
        n = math.prod(d if isinstance(d, int) and d > 0 else 1 for d in i.shape)
        if i.type not in ORT_DTYPES or n > (1 << 24):
            skipped.append(i.name)
            continue
        feeds[i.name] = synthetic_input(i.shape, ORT_DTYPES[i.type])  # zeros
    if not skipped:
        sess.run(None, feeds)
    verdict(ok=True, ran=not skipped, inputs=[[i.name, list(map(str, i.shape)), i.type] for i in sess.get_inputs()])
except EdgeError as e:
    verdict(ok=False, error=e.message)
except Exception as e:
    verdict(ok=False, error=f"ONNX Runtime cannot run this model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
"""


def probe_model(path: str | Path, *, timeout_s: float = 120.0) -> dict:
    """Load ``path`` and run one inference on zeros in a child process; return what it saw.

    For models edgecli did not make: a crash (signal), a hang or a load/run failure becomes a
    one-line ModelFileError, and nothing the model triggers reaches this process's stdout.
    """
    import subprocess
    import sys

    path = Path(path)
    if path.suffix.lower() == ".ort":
        from edgecli.safeio import open_user_file

        with open_user_file(path, "an ORT model", 1 << 62, ModelFileError) as f:  # regular file, never blocks
            if not f.read(8):
                raise ModelFileError(f"{path}: empty file, not an ORT model")
    else:
        load_onnx(path, load_external=False)  # cheap checks (missing, LFS pointer, escaping data) first
    env = {**os.environ, "EDGECLI_PARENT_PID": str(os.getpid()), "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CHILD, str(path)], capture_output=True, text=True, errors="replace",
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"{path}: ONNX Runtime did not load and run this model within {timeout_s:g} s; refused") from None
    return child_verdict(path, proc.returncode, proc.stdout)


def child_verdict(path: Path, returncode: int, stdout: str, runtime: str = "ONNX Runtime") -> dict:
    """Map a probe child's exit to a result or a ModelFileError (a signal death names the signal)."""
    import json
    import signal

    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        raise ModelFileError(f"{path}: {runtime} crashed ({name}) loading or running this model; refused")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    try:
        res = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: the model probe ended without a result (exit {returncode}); refused") from None
    if not res.get("ok"):
        raise ModelFileError(res.get("error") if str(res.get("error", "")).startswith(str(path))
                             else f"{path}: {res.get('error')}")
    return res
