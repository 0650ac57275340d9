"""compress: compose torch-level steps (prune, distill, sparsity) then ONNX-level quantize steps.

Every step is measured the same way before and after (params and MACs for torch models, ONNX
bytes, validation accuracy or fidelity, p50 latency in ONNX Runtime at batch 1), and quantize
steps keep a candidate only when it holds the accuracy budget and the objective on this machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgecli import __version__
from edgecli.artifacts import ArtifactStore, Declared, StageWriter, write_json_atomic
from edgecli.compression import rounded as _r
from edgecli.compression.chain import (
    ChainState,
    build_report,
    confirm_phase,
    external_info,
    quantize_phase,
    torch_phase,
)
from edgecli.compression.evaldata import eval_data, load_calibration_files
from edgecli.compression.fusion import fuse_step
from edgecli.compression.torchsteps import TORCH_STEPS
from edgecli.config import PipelineConfig
from edgecli.errors import ConfigError
from edgecli.safeio import temp_dir as _temp_dir
from edgecli.stages import Built, StageResult, Table, run_stage

STAGE = "compress"


# --------------------------------------------------------------------------- validation and inputs


def check_steps(cfg: PipelineConfig, from_stage: bool) -> None:
    """At least one step; torch steps need the train stage's weights (the schema checks each step and their order)."""
    steps = cfg.compress.steps
    if not steps:
        raise ConfigError("compress.steps: empty; add at least one step (e.g. - quantize: {mode: auto})")
    problems = [f"compress.steps.{i}: {st.kind} needs PyTorch weights, but compress.input is an ONNX file "
                f"({cfg.compress.input}); only quantize steps apply to it (or set compress.input: train)"
                for i, st in enumerate(steps) if st.kind != "quantize" and not from_stage]
    if problems:
        raise ConfigError(problems)


def _input_ref(cfg: PipelineConfig, store: ArtifactStore) -> tuple[str | None, Path]:
    from edgecli.artifacts import STAGES
    from edgecli.stages import resolve_input

    ref = cfg.compress.input
    if ref in STAGES and ref != "train":
        raise ConfigError(f"compress.input: '{ref}' cannot feed compress; use 'train' or a path to an .onnx file")
    return resolve_input(store, ref, ("train",), "compress.input")


def _external_files(path: Path) -> list[Path]:
    from edgecli.onnxio import model_files

    return model_files(path)


def _teachers(cfg: PipelineConfig) -> list[str]:
    out = []
    for st in cfg.compress.steps:
        d = st.options if st.kind == "distill" else getattr(st.options, "distill", None)
        if d is not None and getattr(d, "teacher", "train") != "train":
            out.append(d.teacher)
    return out


def declare(cfg: PipelineConfig, stage: str | None, path: Path) -> Declared:
    """What compress reads: the input model, the pipeline's data (scoring, calibration, fine-tuning),
    calibration files, distill teachers and the source of custom student classes."""
    from edgecli.models import arch_sources, trusted_archs
    from edgecli.stages import declare_data, declare_model

    d = Declared(STAGE, {"seed": cfg.seed, "data": cfg.section("data"), "model": cfg.section("model"),
                         "compress": cfg.section("compress")})
    declare_model(d, stage, path)
    declare_data(d, cfg)
    for s in cfg.compress.steps:
        if s.kind == "quantize" and s.quantize.calibration.data:
            c = s.quantize.calibration.data
            p = Path(c).expanduser()
            if p.is_file():
                d.file(f"calibration:{c}", p)
            else:
                d.values[f"calibration:{c}"] = "missing"
    for t in _teachers(cfg):
        p = Path(t).expanduser()
        for cand in (p, p / "weights.safetensors", p / "train" / "weights.safetensors"):
            if cand.is_file():
                d.file(f"teacher:{t}", cand)
                break
        else:
            d.values[f"teacher:{t}"] = "missing"
    for arch in trusted_archs(cfg)[1:]:
        for p in arch_sources(arch):
            d.file(f"student.arch:{p.name}", p)
    return d


# --------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False) -> StageResult:
    """Compose cfg.compress.steps on the configured input and publish the chosen model."""
    from edgecli.artifacts import STAGES
    from edgecli.report import info as log_info

    check_steps(cfg, from_stage=cfg.compress.input in STAGES)  # config mistakes first, before any file
    log = (lambda m: None) if quiet else (lambda m: log_info(f"compress: {m}"))
    resolved: list[tuple[str | None, Path]] = []

    def inputs() -> Declared:  # called with the run lock held: the input cannot change under us
        resolved.append(_input_ref(cfg, store))
        return declare(cfg, *resolved[-1])

    def build(w: StageWriter) -> Built:
        stage, src_path = resolved[-1]
        with _temp_dir("compress") as tmp:
            return _build(cfg, store, w, Path(tmp), stage, src_path, quiet, log)

    res = run_stage(store, STAGE, inputs, build, render, force=force, command="edgecli compress", load=_load_report)
    from edgecli.stages import stale_upstream_notes

    res.messages += stale_upstream_notes(cfg, store, ("train",))
    return res


def _build(cfg, store, w: StageWriter, work: Path, stage, src_path: Path, quiet: bool, log) -> Built:
    from edgecli.compression.quantize import Scorer

    ch = _local_input(cfg, w, work, stage, src_path)
    if any(s.kind in TORCH_STEPS for s in cfg.compress.steps):
        torch_phase(cfg, store, work, ch, quiet, log)
    # outputs of the FP32 model that quantization starts from: top-1 agreement and cosine for every
    # candidate, and the score itself when no labels fit
    reference = Scorer(ch.data.eval_feeds, None, cfg.compress.threads).outputs(ch.cur)
    if cfg.compress.transformer_optimize:
        ch.cur, fusion = fuse_step(cfg, ch.info, ch.cur, work, ch.data, reference, log)
        ch.records.append(fusion)
    quantize_phase(cfg, work, ch, reference, log)
    confirm_phase(cfg, work, ch, log)
    return _publish(cfg, store, w, stage, src_path, ch)


def _local_input(cfg, w: StageWriter, work: Path, stage, src_path: Path) -> ChainState:
    """Record the input, copy it to one self-contained FP32 file, and decide what to score on."""
    import onnx

    from edgecli.onnxio import inputs_of, load_onnx, parse_model_info

    if stage:
        man = w.add_upstream(stage)
        w.add_input("train/model.onnx", src_path)
    else:
        man = None
        for p in _external_files(src_path):
            w.add_input(str(p), p)
    # a self-contained FP32 copy: every later step reads local files only
    m = load_onnx(src_path)
    meta = {p.key: p.value for p in m.metadata_props}
    src = work / "input.onnx"
    onnx.save(m, str(src))
    del m
    inputs = inputs_of(src)
    files = load_calibration_files(cfg, inputs)
    info = man.get("model_info") if man else parse_model_info(meta.get("edgecli.model_info"), str(src_path))
    # inputs for fidelity scoring when the pipeline's data does not fit an external model
    data = eval_data(cfg, inputs, next(iter(files.values()), None), src, info)
    return ChainState(src=src, inputs=inputs, info=info, meta=meta, data=data, files=files)


def _publish(cfg, store, w: StageWriter, stage, src_path: Path, ch: ChainState) -> Built:
    """Write the model, its metadata, the torch weights and report.json; return the manifest's parts."""
    from edgecli.onnxio import model_bytes, set_metadata

    shutil.copyfile(ch.cur, w.path("model.onnx"))
    model_info = ch.info
    if "edgecli.model_info" not in ch.meta and ch.data.splits is not None:
        # an external model scored on the pipeline's data: record that preprocessing so infer can feed it
        model_info = external_info(ch)
        ch.meta["edgecli.model_info"] = json.dumps(model_info, sort_keys=True)
    lineage = {"input": cfg.compress.input, "steps": [r["kind"] for r in ch.records],
               "chosen": [r.get("chosen") for r in ch.records if r["kind"] == "quantize"]}
    set_metadata(w.path("model.onnx"), {**ch.meta, "edgecli.compress": lineage, "edgecli.version": __version__})
    extra = _publish_weights(store, w, stage, ch)
    if ch.best_rejected is not None:
        i, c = ch.best_rejected
        shutil.copyfile(c.path, w.path("candidate_best.onnx"))
        set_metadata(w.path("candidate_best.onnx"), {**ch.meta, "edgecli.compress": {"rejected": c.name}})
        ch.notes.append(f"step {i}: kept the FP32 input; the best rejected candidate ({c.name}, failed "
                         f"{', '.join(c.failed) or 'build'}) is in candidate_best.onnx for inspection")
    report = build_report(cfg, ch, model_bytes(w.path("model.onnx")), model_bytes(src_path))
    write_json_atomic(w.path("report.json"), report)
    extra.update(model_info=model_info, seed=cfg.seed, metric=ch.data.metric, verdict=report["verdict"])
    first = ch.records[0]["before"] if ch.records else {}
    metrics = {"bytes": report["final"]["bytes"], "size_ratio": report["final"]["size_ratio"],
               "metric": ch.data.metric, "score": report["final"]["score"], "input_score": first.get("score"),
               "p50_ms": report["final"]["p50_ms"], "input_p50_ms": first.get("p50_ms"),
               "failed_constraint": report["failed_constraint"]}
    return Built(cfg.section("compress"), metrics, extra, view=report, notes=ch.notes)


def _publish_weights(store, w: StageWriter, stage, ch: ChainState) -> dict:
    """weights.safetensors: the torch model after the torch steps, else the trained one."""
    extra: dict = {}
    if ch.torch_model is not None:
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().clone() for k, v in ch.torch_model.cpu().state_dict().items()}
        save_file(sd, str(w.path("weights.safetensors")))
        extra["state_dict_shapes"] = {k: list(v.shape) for k, v in sd.items()}
        extra["weights_note"] = "weights.safetensors is the PyTorch model after the torch steps, before quantization"
    elif stage:
        shutil.copyfile(store.require(stage, "weights.safetensors"), w.path("weights.safetensors"))
        extra["weights_note"] = "weights.safetensors is the trained FP32 model (no torch step ran)"
    return extra


def _load_report(stage_dir: Path) -> dict | None:
    """report.json of a published compress stage (the view of a skipped run)."""
    p = stage_dir / "report.json"
    return json.loads(p.read_text()) if p.is_file() else None


def render(res: StageResult, report: dict | None) -> StageResult:
    """The steps table, prune's ratios and every quantize step's candidates, from report.json."""
    if not report:
        return res
    res.details = {"report": str(res.dir / "report.json") if res.dir else None, "verdict": report["verdict"]}
    metric = report["metric"]
    rows = []
    for r in report["steps"]:
        b, a = r["before"], r["after"]
        rows.append([f"{r['index']}: {r['kind']}" if r["index"] >= 0 else r["kind"], b.get("params"), a.get("params"), b.get("macs"), a.get("macs"),
                     b.get("bytes"), a.get("bytes"), b.get("score"), a.get("score"), b.get("p50_ms"), a.get("p50_ms")])
    res.tables.append(Table(f"compress steps ({res.status}; {metric}; p50 at batch 1, {report['threads']} thread(s))",
                            ["step", "params", "->", "MACs", "->", "bytes", "->", metric, "->", "p50 ms", "->"], rows))
    prows = [[r["index"], (r.get("details") or {}).get("ratio_requested"), (r.get("details") or {}).get("ratio_achieved"),
              (r.get("details") or {}).get("round_to"), r["before"].get("p50_ms"), r["after"].get("p50_ms"),
              _r(r["after"]["p50_ms"] / r["before"]["p50_ms"], 3) if r["before"].get("p50_ms") else None]
             for r in report["steps"] if r["kind"] == "prune"]
    if prows:
        res.tables.append(Table("prune: ratio reached and latency (p50 at batch 1)",
                                ["step", "ratio asked", "reached", "round_to", "p50 ms before", "after", "x before"], prows))
    for r in report["steps"]:
        if r["kind"] != "quantize":
            continue
        crow = []
        for c in r["candidates"]:
            crow.append([c["name"], c["bytes"], c["score"], c["accuracy_drop"], c["p50_ms"], c["latency_ratio"],
                         len(c["excluded_nodes"]), "yes" if c["chosen"] else "", c["reason"] or c.get("error") or ""])
        res.tables.append(Table(f"step {r['index']} quantize candidates: {r['verdict']}",
                                ["candidate", "bytes", metric, "drop", "p50 ms", "x input", "excluded", "chosen", "why"],
                                crow))
    return res
