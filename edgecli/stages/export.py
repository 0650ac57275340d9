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

import json
from pathlib import Path

import numpy as np

from edgecli import __version__
from edgecli.artifacts import ArtifactStore, Declared, StageWriter, sha256_file
from edgecli.config import PipelineConfig
from edgecli.errors import CheckFailed, ConfigError, ModelFileError
from edgecli.safeio import temp_dir as _temp_dir
from edgecli.stages import Built, StageResult, Table, run_stage

STAGE = "export"


# --------------------------------------------------------------------------- input and fingerprint


def _input_ref(cfg: PipelineConfig, store: ArtifactStore) -> tuple[str | None, Path]:
    from edgecli.artifacts import STAGES
    from edgecli.stages import resolve_input

    ref = cfg.export.input
    if ref in STAGES and ref not in ("train", "compress"):
        raise ConfigError(f"export.input: '{ref}' cannot feed export; use 'compress', 'train' or a path to an .onnx file")
    return resolve_input(store, ref, ("compress", "train"), "export.input")


def declare(cfg: PipelineConfig, stage: str | None, path: Path) -> Declared:
    """The export section, the input (upstream manifest, or the file and its external data), and the
    data parity reads."""
    from edgecli.stages import declare_data, declare_model

    d = Declared(STAGE, {"seed": cfg.seed, "export": cfg.section("export"), "data": cfg.section("data"),
                         "input_stage": stage})
    declare_model(d, stage, path)
    declare_data(d, cfg)
    return d


def _run(path: Path, feeds: dict, batch: int = 256, level: str = "disable") -> np.ndarray:
    """First output of ``path`` over ``feeds``, batched, at ONNX Runtime optimisation ``level``."""
    from edgecli.runtimes.ort import make_session, run_batched

    return run_batched(make_session(path, threads=1, optimization=level), feeds, batch).astype(np.float64)


# --------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False) -> StageResult:
    """Optimise, convert and check the input model; publish model.onnx, model.ort and card.json."""
    from edgecli.report import info as log_info

    log = (lambda m: None) if quiet else (lambda m: log_info(f"export: {m}"))
    resolved: list[tuple[str | None, Path]] = []

    def inputs() -> Declared:  # called with the run lock held: compress cannot be mid-publish while we pick our input
        resolved.append(_input_ref(cfg, store))
        return declare(cfg, *resolved[-1])

    def build(w: StageWriter) -> Built:
        stage, src = resolved[-1]
        _require_runtimes(cfg)  # a target whose runtime is not installed: its one line before any work
        with _temp_dir("export") as tmp:
            return _build(cfg, store, w, Path(tmp), stage, src, log)

    res = run_stage(store, STAGE, inputs, build, render, force=force, command="edgecli export", load=_load_card)
    from edgecli.stages import stale_upstream_notes

    res.messages += stale_upstream_notes(cfg, store, ("train", "compress"))
    return res


def _require_runtimes(cfg: PipelineConfig) -> None:
    """Every runtime export.targets names is usable here, else the ConfigError naming its extra (``auto``
    builds only what is installed)."""
    from edgecli import runtimes
    from edgecli.runtimes.targets import TARGETS, parse

    if cfg.export.targets in ("auto", ["auto"]):
        return
    for t in cfg.export.targets:
        runtimes.require(TARGETS[parse(t)[0]][0])


def _build(cfg: PipelineConfig, store: ArtifactStore, w: StageWriter, work: Path, stage: str | None, src: Path,
           log) -> Built:
    """Read the input, take its reference outputs, pick the optimisation level, check parity, publish."""
    from edgecli.artifacts import lineage_privacy
    from edgecli.onnxio import batch_dynamic, is_quantized, parity_samples

    lineage = _record_inputs(w, stage, src)
    src_model, meta, info, inputs, src_local = _read_input(cfg, stage, src, work, lineage)
    quantized = is_quantized(src_model)
    pc = cfg.export.parity
    feeds, labels, sample_src = parity_samples(cfg, info, inputs, pc.samples)
    log(f"parity samples: {sample_src}")
    # float: both graphs as written ("disable"), so what is measured is what export did to them.
    # quantized: both as ONNX Runtime runs them (QDQ fused into integer kernels at "extended"); as
    # written, a QDQ graph computes in float and would differ from any deployed run of either model
    run_level = "extended" if quantized else "disable"
    ref = _run(src_local, feeds, level=run_level)
    cand, level, gnotes, notes = _choose_level(cfg, src_model, work, meta, log)
    import onnx

    m = onnx.load(str(cand))
    if batch_dynamic(src_model) and not batch_dynamic(m):
        raise CheckFailed("export: the optimised model lost the dynamic batch axis; nothing was published")
    par = _check_parity(cfg, ref, _run(cand, feeds, level=run_level), labels, sample_src, quantized, run_level)
    card = _card(m, cfg, stage, src, info, lineage, level, par, gnotes, notes, quantized)
    card.update(lineage_privacy(store, lineage))
    _publish(cfg, w, m, card, level, feeds, (store, work, stage, src_local, info, quantized, labels, log, par))
    files = card["files"]
    metrics = {"bytes": files["model.onnx"]["bytes"], "sha256": files["model.onnx"]["sha256"],
               "opset": card["opset"], "optimization_level": level or "none",
               "parity_max_abs_diff": par["max_abs_diff"], "parity_top1_agreement": par.get("top1_agreement"),
               "accuracy_delta": par.get("accuracy_delta"), "ort_bytes": files.get("model.ort", {}).get("bytes")}
    extra = {"model_info": info, "card": {k: v for k, v in card.items() if k != "files"}, "seed": cfg.seed}
    return Built(cfg.section("export"), metrics, extra, view=card, notes=notes)


def _record_inputs(w: StageWriter, stage: str | None, src: Path) -> dict:
    """Record the input (an upstream stage, or files) in the manifest; return the model's lineage."""
    from edgecli.onnxio import model_files

    lineage = {}
    if stage:
        up = w.add_upstream(stage)
        lineage[stage] = w.upstream[stage]
        w.add_input(f"{stage}/model.onnx", src)
        # a compressed model's own lineage: the train manifest it was made from
        for k, v in (up.get("upstream") or {}).items():
            lineage.setdefault(k, v)
    else:
        for p in model_files(src):
            w.add_input(str(p), p)
            lineage[f"file:{p.name}"] = sha256_file(p)
    return lineage


def _read_input(cfg: PipelineConfig, stage: str | None, src: Path, work: Path, lineage: dict):
    """(model, metadata for the export, model_info, inputs, self-contained local copy) of the input."""
    from edgecli.onnxio import load_onnx, model_inputs, parse_model_info, save_model

    src_model = load_onnx(src)  # guarded: truncated, non-ONNX, escaping external data are refused here
    meta = {p.key: p.value for p in src_model.metadata_props}
    meta.pop("edgecli.card", None)
    info = parse_model_info(meta.get("edgecli.model_info"), str(src))
    src_local = work / "input.onnx"
    save_model(src_model, src_local)  # self-contained: external data (if any) read once, locally
    inputs = model_inputs(src_model)
    if not inputs:
        raise ModelFileError(f"{src}: the model has no inputs")
    meta["edgecli.export"] = json.dumps({"input": cfg.export.input or stage, "input_stage": stage,
                                         "lineage": lineage}, sort_keys=True)
    meta["edgecli.version"] = __version__
    return src_model, meta, info, inputs, src_local


def _choose_level(cfg: PipelineConfig, src_model, work: Path, meta: dict, log):
    """(candidate path, level, graph notes, notes): the configured level, or basic when extended fails a check."""
    from edgecli.onnxio import full_check, prepare_export
    from edgecli.runtimes.ort import convert_to_ort

    levels: list[str | None] = [cfg.export.optimization_level] if cfg.export.optimize else [None]
    if levels[0] == "extended":
        levels.append("basic")
    notes: list[str] = []
    for level in levels:
        cand, gnotes = prepare_export(src_model, work, cfg.export.opset, level, meta)
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
        return cand, level, gnotes, notes
    raise AssertionError("unreachable: the last level either passes or raises")


def _check_parity(cfg: PipelineConfig, ref, got, labels, sample_src: str, quantized: bool, run_level: str) -> dict:
    """The parity record of the candidate against its input; CheckFailed (nothing published) when it fails."""
    from edgecli.onnxio import parity

    pc = cfg.export.parity
    par = parity(ref, got, labels=labels)
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
    if not ok:
        raise CheckFailed(f"export parity ({par['mode']} input, {sample_src}): the exported model differs from its "
                          f"input: {what}; nothing was published")
    return par


def _publish(cfg: PipelineConfig, w: StageWriter, m, card: dict, level: str | None, feeds: dict,
             tctx: tuple) -> None:
    """The card embedded, then the final model.onnx, model.ort (checked against it), the other runtimes'
    targets (each parity-checked) and card.json."""
    store, work, stage, src_local, info, quantized, labels, log, par = tctx
    from edgecli.onnxio import full_check, model_bytes, parity, save_model
    from edgecli.runtimes.ort import convert_to_ort

    pc = cfg.export.parity
    e = m.metadata_props.add()
    e.key, e.value = "edgecli.card", json.dumps(card, sort_keys=True)
    final = w.path("model.onnx")
    save_model(m, final)
    full_check(final)
    files = {"model.onnx": {"bytes": model_bytes(final), "sha256": sha256_file(final)}}
    if cfg.export.writes_ort:
        ort_path, cfg_path = convert_to_ort(final, w.dir, level or "disable")
        ort_check = parity(_run(final, feeds), _run(ort_path, feeds))
        ort_check["passed"] = ort_check["max_abs_diff"] <= pc.atol and ort_check.get("top1_agreement", 1.0) == 1.0
        if not ort_check["passed"]:
            raise CheckFailed(f"export: model.ort differs from model.onnx (max abs diff {ort_check['max_abs_diff']:.3g}, "
                              f"top-1 agreement {ort_check.get('top1_agreement', 1.0):.4f}); nothing was published")
        files["model.ort"] = {"bytes": ort_path.stat().st_size, "sha256": sha256_file(ort_path)}
        files["required_operators.config"] = {"bytes": cfg_path.stat().st_size, "sha256": sha256_file(cfg_path)}
        card["ort_check"] = ort_check
    from edgecli.runtimes.choose import publish as publish_targets  # tflite / pte / openvino / auto

    card["targets"], auto = publish_targets(cfg, store, w, work, stage, src_local, info, quantized, feeds, labels,
                                            final, files, log, par)
    files.update({n: f for t in card["targets"] for n, f in t["files"].items()})
    if auto:
        card["auto"] = auto
    card["files"] = files
    (w.dir / "card.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _card(m, cfg, stage, src: Path, info: dict | None, lineage: dict, level, par: dict, gnotes: dict,
          notes: list[str], quantized: bool) -> dict:
    from edgecli.onnxio import io_desc, opset_of

    inits = {t.name for t in m.graph.initializer}
    return {
        "format": "edgecli.card/1",
        "edgecli_version": __version__,
        "inputs": [io_desc(v) for v in m.graph.input if v.name not in inits],
        "outputs": [io_desc(v) for v in m.graph.output],
        "output_names": [v.name for v in m.graph.output],
        "kind": (info or {}).get("kind"),
        "arch": (info or {}).get("arch"),
        "num_classes": (info or {}).get("num_classes"),
        "class_names": (info or {}).get("class_names"),
        "preprocess": (info or {}).get("preprocess"),
        **({"feature_names": info["feature_names"], "label_column": info.get("label_column")}
           if (info or {}).get("feature_names") else {}),
        "source": {"input": cfg.export.input or stage, "stage": stage, "path": str(src)},
        "lineage": lineage,
        "opset": opset_of(m),
        "ir_version": int(m.ir_version),
        "quantized": quantized,
        "optimization_level": level or "none",
        "deduplicated_initializers": gnotes.get("deduplicated_initializers", 0),
        "parity": par,
        "notes": notes,
    }


def _load_card(stage_dir: Path) -> dict | None:
    """card.json of a published export stage (the view of a skipped run); None when it cannot be read."""
    try:
        return json.loads((stage_dir / "card.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def render(res: StageResult, card: dict | None) -> StageResult:
    """The export table (input, optimisation, parity, files) and each target's, from the card."""
    if card is None:
        return res
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
