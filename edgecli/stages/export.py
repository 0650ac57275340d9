"""export: the deployable bundle, checked against its input before it is published.

Outputs in ``<run>/export/``:

- ``model.onnx``: the input model converted to ``export.opset`` (when set), optimised offline by
  ONNX Runtime at a portable level (basic or extended; never "all", whose layout transforms
  depend on this CPU), identical initializers merged, weights inside the file (external data
  only above protobuf's 2 GB limit), edgecli metadata kept, checked with the full ONNX checker.
- ``model.ort`` and ``required_operators.config``: ONNX Runtime's format for mobile/minimal
  builds and the operator list such a build needs, made by ``onnxruntime.tools``'
  convert_onnx_models_to_ort at the same portable level. model.ort is run on the parity samples
  and must give model.onnx's outputs.
- ``card.json``: what a deployer needs (input name/shape/dtype, outputs, labels, preprocessing,
  lineage, opset, parity). The same card, minus ``files`` and ``ort_check`` (they describe the
  final files, which contain the card), is stored in model.onnx's metadata_props as
  ``edgecli.card``. ``files["model.onnx"].sha256`` is the sha256 of the published model.onnx;
  the manifest records the same hash and ``edgecli infer`` prints the hash of the file it loaded.

Parity (before anything is published), on the test split through the model's own preprocessing,
or on seeded random inputs for a model edgecli knows nothing about:
- a float input: max abs diff <= export.parity.atol and top-1 agreement 100%;
- a quantized input (QDQ, integer or FP16 ops): top-1 agreement >= export.parity.min_agreement_quantized,
  and the accuracy delta (input vs exported) is reported.
A failure raises CheckFailed (exit 1) with the numbers; nothing is published.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from edgecli import __version__
from edgecli.artifacts import ArtifactStore, StageWriter, sha256_file, sha256_json, upstream_fingerprint
from edgecli.config import PipelineConfig
from edgecli.errors import CheckFailed, ConfigError, DataError, ModelFileError
from edgecli.safeio import temp_dir as _temp_dir
from edgecli.stages import StageResult, Table, run_stage

STAGE = "export"
TWO_GB = 2**31
# ops whose presence means the model computes in reduced precision: parity is judged by top-1
# agreement and accuracy delta there, since offline fusion (QDQ -> QLinearConv) changes rounding
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
             "DynamicQuantizeLinear", "MatMulNBits", "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul",
             "QAttention", "QGemm", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid"}


# --------------------------------------------------------------------------- input and fingerprint


def _input_ref(cfg: PipelineConfig, store: ArtifactStore) -> tuple[str | None, Path]:
    from edgecli.artifacts import STAGES
    from edgecli.stages import resolve_input

    ref = cfg.export.input
    if ref in STAGES and ref not in ("train", "compress"):
        raise ConfigError(f"export.input: '{ref}' cannot feed export; use 'compress', 'train' or a path to an .onnx file")
    return resolve_input(store, ref, ("compress", "train"), "export.input")


def _model_files(path: Path) -> list[Path]:
    """An ONNX file and the external-data files it names (what the input's hash covers)."""
    from edgecli.onnxio import _external_tensors, load_onnx

    m = load_onnx(path, load_external=False)
    locs = sorted({dict((e.key, e.value) for e in t.external_data).get("location", "") for t in _external_tensors(m)})
    return [path] + [path.parent / loc for loc in locs if loc]


def fingerprint(cfg: PipelineConfig, store: ArtifactStore, stage: str | None, path: Path) -> str:
    """Export section + the upstream manifest hash (or the input file hashes) + what parity reads."""
    files = {} if stage else {p.name: sha256_file(p) for p in _model_files(path)}
    return sha256_json({
        "stage": STAGE, "version": __version__, "seed": cfg.seed, "export": cfg.section("export"),
        "data": cfg.section("data"), "input_stage": stage,
        "upstream": upstream_fingerprint(store, stage) if stage else None, "files": files,
    })


# --------------------------------------------------------------------------- graph work


def _opset(m) -> int:
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def convert_opset(m, target: int | None):
    """Convert the default-domain opset to ``target``; a ConfigError when ONNX cannot."""
    import onnx
    from onnx import version_converter

    cur = _opset(m)
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


def _tensor_bytes(m) -> int:
    return sum(len(t.raw_data) or 0 for t in m.graph.initializer)


def save_model(m, path: Path) -> None:
    """Weights inside the file; external data (beside it) only when protobuf's 2 GB limit forces it."""
    import onnx

    if _tensor_bytes(m) > TWO_GB - (64 << 20):
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(m, str(path))


def full_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckFailed(f"export: the exported model fails the ONNX checker ({msg}); nothing was published") from None


def ort_optimize(src: Path, dst: Path, level: str) -> None:
    """ONNX Runtime's offline graph optimisation at a portable level, saved as ONNX."""
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

    with _temp_dir("ort") as tmp:
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


def _batch_dynamic(m) -> bool | None:
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
    from onnx import TensorProto

    if any(n.op_type in QUANT_OPS for n in m.graph.node):
        return True
    return any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)


# --------------------------------------------------------------------------- parity samples


def parity_samples(cfg: PipelineConfig, info: dict | None, inputs, n: int) -> tuple[dict, np.ndarray | None, str]:
    """(feeds, labels or None, source): the test split through the model's preprocessing, else seeded random."""
    from edgecli.compression.quantize import fit_problem

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
    rng = np.random.default_rng(cfg.seed)
    feeds = {}
    for spec_in in inputs:
        shape = [n] + [d or 1 for d in spec_in.shape[1:]]
        dt = np.dtype(spec_in.dtype)
        if np.issubdtype(dt, np.integer):
            feeds[spec_in.name] = rng.integers(0, 100, size=shape).astype(dt)
        elif dt == np.bool_:
            feeds[spec_in.name] = np.ones(shape, dtype=bool)
        else:
            feeds[spec_in.name] = rng.standard_normal(shape).astype(dt)
    why = f" ({problem})" if problem else ""
    return feeds, None, f"seeded random inputs ({n} samples){why}"


def _run(path: Path, feeds: dict, batch: int = 256, level: str = "disable") -> np.ndarray:
    """First output of ``path`` over ``feeds``, batched, at ONNX Runtime optimisation ``level``."""
    from edgecli.runtime import make_session

    sess = make_session(path, threads=1, optimization=level)
    n = len(next(iter(feeds.values())))
    outs = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs).astype(np.float64)


def compare(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """max abs diff, top-1 agreement and (with labels) both accuracies."""
    res = {"samples": int(len(ref)), "max_abs_diff": float(np.max(np.abs(ref - got))) if ref.size else 0.0}
    if ref.ndim == 2 and ref.shape[1] > 1:
        res["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
        if labels is not None:
            a_in = float(np.mean(ref.argmax(1) == labels))
            a_out = float(np.mean(got.argmax(1) == labels))
            res.update(input_accuracy=a_in, export_accuracy=a_out, accuracy_delta=a_out - a_in)
    return res


# --------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False) -> StageResult:
    """Optimise, convert and check the input model; publish model.onnx, model.ort and card.json."""
    from edgecli.report import info as log_info

    state: dict = {}
    log = (lambda m: None) if quiet else (lambda m: log_info(f"export: {m}"))

    def fp():  # called with the run lock held: compress cannot be mid-publish while we pick our input
        state["input"] = _input_ref(cfg, store)
        return fingerprint(cfg, store, *state["input"])

    def build(w: StageWriter):
        stage, src = state["input"]
        with _temp_dir("export") as tmp:
            return _build(cfg, store, w, Path(tmp), stage, src, state, log)

    res = run_stage(store, STAGE, fp, force, build, command="edgecli export")
    from edgecli.stages import stale_upstream_notes

    res.messages += stale_upstream_notes(cfg, store, ("train", "compress"))
    return _result(res, state, store)


def _prepare(src_model, work: Path, cfg: PipelineConfig, level: str | None, meta: dict) -> tuple[Path, dict]:
    """Opset, ORT optimisation, de-duplication, metadata: one candidate model.onnx in ``work``."""
    import onnx

    notes = {}
    m = convert_opset(src_model, cfg.export.opset)
    stage_in = work / "converted.onnx"
    save_model(m, stage_in)
    if level:
        opt = work / f"optimized-{level}.onnx"
        ort_optimize(stage_in, opt, level)
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


def _build(cfg: PipelineConfig, store: ArtifactStore, w: StageWriter, work: Path, stage: str | None, src: Path,
           state: dict, log):
    import onnx

    from edgecli.compression.quantize import model_inputs
    from edgecli.onnxio import load_onnx, parse_model_info

    lineage = {}
    if stage:
        up = w.add_upstream(stage)
        lineage[stage] = w.upstream[stage]
        w.add_input(f"{stage}/model.onnx", src)
        # a compressed model's own lineage: the train manifest it was made from
        for k, v in (up.get("upstream") or {}).items():
            lineage.setdefault(k, v)
    else:
        for p in _model_files(src):
            w.add_input(str(p), p)
            lineage[f"file:{p.name}"] = sha256_file(p)
    src_model = load_onnx(src)  # guarded: truncated, non-ONNX, escaping external data are refused here
    meta = {p.key: p.value for p in src_model.metadata_props}
    meta.pop("edgecli.card", None)
    info = parse_model_info(meta.get("edgecli.model_info"), str(src))
    src_local = work / "input.onnx"
    save_model(src_model, src_local)  # self-contained: external data (if any) read once, locally
    inputs = model_inputs(src_model)
    if not inputs:
        raise ModelFileError(f"{src}: the model has no inputs")
    quantized = is_quantized(src_model)
    src_dynamic = _batch_dynamic(src_model)
    meta["edgecli.export"] = json.dumps({"input": cfg.export.input or stage, "input_stage": stage,
                                         "lineage": lineage}, sort_keys=True)
    meta["edgecli.version"] = __version__

    pc = cfg.export.parity
    feeds, labels, sample_src = parity_samples(cfg, info, inputs, pc.samples)
    log(f"parity samples: {sample_src}")
    # float: both graphs as written ("disable"), so what is measured is what export did to them.
    # quantized: both as ONNX Runtime runs them (QDQ fused into integer kernels at "extended"); as
    # written, a QDQ graph computes in float and would differ from any deployed run of either model
    run_level = "extended" if quantized else "disable"
    ref = _run(src_local, feeds, level=run_level)

    levels: list[str | None] = [cfg.export.optimization_level] if cfg.export.optimize else [None]
    if levels[0] == "extended":
        levels.append("basic")
    notes: list[str] = []
    chosen = None
    for level in levels:
        cand, gnotes = _prepare(src_model, work, cfg, level, meta)
        problem = None
        try:
            full_check(cand)
            if cfg.export.writes_ort:
                convert_to_ort(cand, _mkdir(work / f"ortcheck-{level}"), level or "disable")
        except CheckFailed as e:
            problem = e.message
        if problem and level == "extended":
            notes.append(f"extended optimisation rejected ({problem.removeprefix('export: ')}); fell back to basic")
            log(notes[-1])
            continue
        if problem:
            raise CheckFailed(problem)
        chosen = (cand, level, gnotes)
        break
    assert chosen is not None
    cand, level, gnotes = chosen
    m = onnx.load(str(cand))
    if src_dynamic and not _batch_dynamic(m):
        raise CheckFailed("export: the optimised model lost the dynamic batch axis; nothing was published")

    got = _run(cand, feeds, level=run_level)
    par = compare(ref, got, labels)
    par.update(source=sample_src, mode="quantized" if quantized else "float", runtime_level=run_level)
    if quantized:
        par["min_agreement"] = pc.min_agreement_quantized
        ok = par.get("top1_agreement", 1.0) >= pc.min_agreement_quantized
        what = (f"top-1 agreement {par.get('top1_agreement', 1.0):.4f} < {pc.min_agreement_quantized}"
                + (f", accuracy delta {par['accuracy_delta']:+.4f}" if "accuracy_delta" in par else ""))
    else:
        par["atol"] = pc.atol
        ok = par["max_abs_diff"] <= pc.atol and par.get("top1_agreement", 1.0) == 1.0
        what = f"max abs diff {par['max_abs_diff']:.3g} (atol {pc.atol:g}), top-1 agreement {par.get('top1_agreement', 1.0):.4f}"
    par["passed"] = bool(ok)
    state["parity"] = par
    if not ok:
        raise CheckFailed(f"export parity ({par['mode']} input, {sample_src}): the exported model differs from its "
                          f"input: {what}; nothing was published")

    # the card, embedded, then the final file
    card = _card(m, cfg, stage, src, info, lineage, level, par, gnotes, notes, quantized)
    card.update(_training_privacy(store, lineage))
    e = m.metadata_props.add()
    e.key, e.value = "edgecli.card", json.dumps(card, sort_keys=True)
    final = w.path("model.onnx")
    save_model(m, final)
    full_check(final)
    files = {"model.onnx": {"bytes": _bytes(final), "sha256": sha256_file(final)}}
    if cfg.export.writes_ort:
        ort_path, cfg_path = convert_to_ort(final, w.dir, level or "disable")
        ort_out = _run_ort(ort_path, feeds)
        onnx_out = _run(final, feeds)
        ort_check = compare(onnx_out, ort_out, None)
        ort_check["passed"] = ort_check["max_abs_diff"] <= pc.atol and ort_check.get("top1_agreement", 1.0) == 1.0
        if not ort_check["passed"]:
            raise CheckFailed(f"export: model.ort differs from model.onnx (max abs diff {ort_check['max_abs_diff']:.3g}, "
                              f"top-1 agreement {ort_check.get('top1_agreement', 1.0):.4f}); nothing was published")
        files["model.ort"] = {"bytes": ort_path.stat().st_size, "sha256": sha256_file(ort_path)}
        files["required_operators.config"] = {"bytes": cfg_path.stat().st_size, "sha256": sha256_file(cfg_path)}
        card["ort_check"] = ort_check
        state["ort_check"] = ort_check
    from edgecli.runtimes.targets import publish as publish_targets  # tflite / pte / openvino / auto

    card["targets"], auto = publish_targets(cfg, store, w, work, stage, src_local, info, quantized, feeds, labels,
                                            final, files, log, par)
    files.update({n: f for t in card["targets"] for n, f in t["files"].items()})
    if auto:
        card["auto"] = state["auto"] = auto
    card["files"] = files
    (w.dir / "card.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    state.update(card=card, notes=notes)
    metrics = {"bytes": files["model.onnx"]["bytes"], "sha256": files["model.onnx"]["sha256"],
               "opset": card["opset"], "optimization_level": level or "none",
               "parity_max_abs_diff": par["max_abs_diff"], "parity_top1_agreement": par.get("top1_agreement"),
               "accuracy_delta": par.get("accuracy_delta"), "ort_bytes": files.get("model.ort", {}).get("bytes")}
    extra = {"model_info": info, "card": {k: v for k, v in card.items() if k != "files"}, "seed": cfg.seed}
    return cfg.section("export"), metrics, extra


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _bytes(path: Path) -> int:
    from edgecli.onnxio import model_bytes

    return model_bytes(path)


def _run_ort(path: Path, feeds: dict) -> np.ndarray:
    return _run(path, feeds)


def _io_desc(vi) -> dict:
    from onnx import helper

    tt = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim]
    return {"name": vi.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name
            if tt.elem_type else None}


def _training_privacy(store: ArtifactStore, lineage: dict) -> dict:
    """The train manifest's privacy/federated record (ε spent, δ, ...) when this model descends from it.

    Only the train manifest whose hash is in the lineage counts: a train stage rerun since then
    does not describe this model.
    """
    out: dict = {}
    if "train" not in lineage or not store.exists("train"):
        return out
    mpath = store.stage_dir("train") / "manifest.json"
    if sha256_file(mpath) != lineage["train"]:
        return out
    man = json.loads(mpath.read_text())
    if man.get("privacy"):
        out["privacy"] = man["privacy"]
    if man.get("federated"):
        out["federated"] = man["federated"]
    return out


def _card(m, cfg, stage, src: Path, info: dict | None, lineage: dict, level, par: dict, gnotes: dict,
          notes: list[str], quantized: bool) -> dict:
    inits = {t.name for t in m.graph.initializer}
    return {
        "format": "edgecli.card/1",
        "edgecli_version": __version__,
        "inputs": [_io_desc(v) for v in m.graph.input if v.name not in inits],
        "outputs": [_io_desc(v) for v in m.graph.output],
        "output_names": [v.name for v in m.graph.output],
        "kind": (info or {}).get("kind"),
        "arch": (info or {}).get("arch"),
        "num_classes": (info or {}).get("num_classes"),
        "class_names": (info or {}).get("class_names"),
        "preprocess": (info or {}).get("preprocess"),
        "source": {"input": cfg.export.input or stage, "stage": stage, "path": str(src)},
        "lineage": lineage,
        "opset": _opset(m),
        "ir_version": int(m.ir_version),
        "quantized": quantized,
        "optimization_level": level or "none",
        "deduplicated_initializers": gnotes.get("deduplicated_initializers", 0),
        "parity": par,
        "notes": notes,
    }


def _result(res: StageResult, state: dict, store: ArtifactStore) -> StageResult:
    if res.status == "skipped":
        try:
            card = json.loads((store.stage_dir(STAGE) / "card.json").read_text())
        except (OSError, json.JSONDecodeError):
            return res
    else:
        card = state.get("card", {})
        res.messages += state.get("notes", [])
    par = card.get("parity", {})
    rows = [
        ["input", card.get("source", {}).get("input")],
        ["opset", card.get("opset")],
        ["optimization", card.get("optimization_level")],
        ["merged initializers", card.get("deduplicated_initializers")],
        ["parity samples", par.get("source")],
        ["max abs diff", par.get("max_abs_diff")],
        ["top-1 agreement", par.get("top1_agreement")],
    ]
    if par.get("accuracy_delta") is not None:
        rows.append(["accuracy input -> export", f"{par['input_accuracy']:.4f} -> {par['export_accuracy']:.4f}"])
    for name, f in card.get("files", {}).items():
        rows.append([f"{name} bytes", f["bytes"]])
    if "model.onnx" in card.get("files", {}):
        rows.append(["model.onnx sha256", card["files"]["model.onnx"]["sha256"][:16] + "..."])
    res.tables.append(Table(f"export ({'parity passed' if par.get('passed') else 'parity'})", ["", "value"], rows))
    from edgecli.runtimes.targets import tables as target_tables

    res.tables += [Table(title, cols, trows) for title, cols, trows in target_tables(card)]
    res.details["card"] = card
    return res
