"""compress: compose torch-level steps (prune, distill, sparsity) then ONNX-level quantize steps.

Every step is measured the same way before and after (params and MACs for torch models, ONNX
bytes, validation accuracy or fidelity, p50 latency in ONNX Runtime at batch 1), and quantize
steps keep a candidate only when it holds the accuracy budget and the objective on this machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgecli import __version__
from edgecli.artifacts import ArtifactStore, Declared, StageWriter, write_json_atomic
from edgecli.config import PipelineConfig
from edgecli.errors import ArtifactError, ConfigError, DataError
from edgecli.safeio import temp_dir as _temp_dir
from edgecli.stages import StageResult, Table, run_stage

STAGE = "compress"
TORCH_STEPS = ("prune", "distill", "sparsity")
_STEP_FUNCS = {"prune": "edgecli.compression.prune:prune_step", "distill": "edgecli.compression.distill:distill_step",
               "sparsity": "edgecli.compression.prune:sparsity_step"}


# --------------------------------------------------------------------------- validation and inputs


def check_steps(cfg: PipelineConfig, from_stage: bool) -> None:
    """Torch steps first, then quantize steps; torch steps need the train stage's weights."""
    from edgecli.compression.quantize import check_options

    steps = cfg.compress.steps
    if not steps:
        raise ConfigError("compress.steps: empty; add at least one step (e.g. - quantize: {mode: auto})")
    problems = []
    seen_quant = None
    for i, st in enumerate(steps):
        key = f"compress.steps.{i}"
        if st.kind == "quantize":
            seen_quant = seen_quant if seen_quant is not None else i
            try:
                check_options(st.quantize, f"{key}.quantize")
            except ConfigError as e:
                problems += e.problems
        else:
            if seen_quant is not None:
                problems.append(f"{key}: {st.kind} is a PyTorch-level step and must come before every quantize step "
                                f"(compress.steps.{seen_quant} quantizes the ONNX model; nothing trainable is left after it)")
            if not from_stage:
                problems.append(f"{key}: {st.kind} needs PyTorch weights, but compress.input is an ONNX file "
                                f"({cfg.compress.input}); only quantize steps apply to it (or set compress.input: train)")
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


# --------------------------------------------------------------------------- evaluation data


class _Data:
    """What every step is scored and timed on, decided once per run."""

    def __init__(self):
        self.eval_feeds: dict | None = None
        self.labels = None
        self.metric = "accuracy"
        self.splits = None
        self.fit_note = ""
        self.kind_note = ""
        self.embedding = False


def _subset(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _eval_data(cfg: PipelineConfig, inputs, calib_file_feeds: dict | None, model_path: Path,
               info: dict | None) -> _Data:
    """Validation split when the pipeline's data fits the model input, else the user's inputs (fidelity).

    The metric follows from the model's output (``output_kind``): class scores are scored by accuracy
    (or top-1 agreement without labels), embeddings and regressors by the worst per-sample cosine.
    """
    from edgecli.compression.quantize import output_kind
    from edgecli.onnxio import load_onnx
    from edgecli.runtimes.feeds import fit_problem, n_samples, take

    d = _Data()
    problem = None
    try:
        from edgecli.data import load_splits

        splits = load_splits(cfg)
        if isinstance(splits.val.x, dict):  # text: the tokenizer's arrays feed the model's named inputs
            missing = [i.name for i in inputs if i.name not in splits.val.x]
            if missing:
                problem = f"the preprocessing gives {sorted(splits.val.x)}, not the model input(s) {missing}"
            for spec in inputs:
                problem = problem or fit_problem(splits.val.x[spec.name][:1], spec)
        elif len(inputs) != 1:
            problem = f"the model has {len(inputs)} inputs"
        else:
            problem = fit_problem(splits.val.x[:1], inputs[0])
        if problem is None:
            d.splits = splits
    except DataError as e:
        problem = e.message
    kind, why = output_kind(load_onnx(model_path, load_external=False), info,
                            d.splits.num_classes if d.splits is not None else None)
    d.kind_note = f"metric {'cosine_min' if kind == 'embedding' else 'accuracy/top-1'} chosen from the output: {why}"
    d.embedding = kind == "embedding"
    if d.splits is not None:
        idx = _subset(len(d.splits.val), cfg.compress.eval_samples, cfg.seed)
        d.eval_feeds = _feeds(d.splits.val.x, inputs, idx)
        d.labels = d.splits.val.y[idx]
        if d.embedding:  # not class scores: fidelity of the outputs to the FP32 model, per sample
            d.labels, d.metric = None, "cosine_min"
        return d
    d.fit_note = f"the pipeline's data does not fit the model input ({problem}); scoring fidelity to the input model"
    d.metric = "cosine_min" if d.embedding else "fidelity"
    if calib_file_feeds is None:
        raise DataError(
            f"compress: {d.fit_note.split(';')[0]}, and no calibration.data file gives model inputs to score on",
            hint="set compress.steps.N.quantize.calibration.data to an .npy/.npz of model inputs",
        )
    n = n_samples(calib_file_feeds)
    idx = _subset(n, cfg.compress.eval_samples, cfg.seed)
    d.eval_feeds = take(calib_file_feeds, idx)
    return d


def _feeds(x, inputs, idx) -> dict[str, np.ndarray]:
    """Model feeds for rows ``idx`` of a split: one array, or a dict keyed by input name (text)."""
    if isinstance(x, dict):
        return {i.name: np.ascontiguousarray(x[i.name][idx]) for i in inputs}
    return {inputs[0].name: np.ascontiguousarray(x[idx])}


def _calibration(cfg, st_opts, key: str, inputs, data: _Data) -> tuple[dict | None, str | None, str]:
    """(feeds, problem, source) for one quantize step."""
    from edgecli.runtimes.feeds import load_input_file, n_samples, take

    cal = st_opts.calibration
    if cal.data:
        feeds = load_input_file(Path(cal.data), inputs, f"{key}.calibration.data")
        idx = np.arange(min(cal.samples, n_samples(feeds)))
        return take(feeds, idx), None, f"{cal.data} ({len(idx)} samples)"
    if data.splits is None:
        return None, (f"{key}.calibration.data: static quantization needs calibration inputs; the pipeline's data "
                      "does not fit this model, so give an .npy/.npz of model inputs"), ""
    idx = _subset(len(data.splits.train), cal.samples, cfg.seed)
    return _feeds(data.splits.train.x, inputs, idx), None, f"train split ({len(idx)} samples)"


# --------------------------------------------------------------------------- torch steps


def _load_step_func(kind: str, key: str):
    import importlib

    mod, _, attr = _STEP_FUNCS[kind].partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}: '{kind}' steps are not available in this build of edgecli "
                          f"({_STEP_FUNCS[kind]} is missing); use quantize steps only") from None


def _measure_torch(model, info, cfg, splits, work: Path, tag: str, data: _Data) -> dict:
    """Export a torch model to ONNX (parity checked) and measure it like any step output."""
    from edgecli.compression.quantize import Scorer
    from edgecli.models.zoo import count_macs, count_params
    from edgecli.onnxio import model_bytes, save_model_files

    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    par = save_model_files(d, model, cfg, info, splits.test.x, cfg.train.opset, cfg.train.parity_atol,
                           f"compress {tag} parity (ONNX Runtime vs PyTorch)")
    sc = Scorer(data.eval_feeds, data.labels, cfg.compress.threads).score(d / "model.onnx")
    return {"dir": d, "params": count_params(model), "macs": count_macs(model, info["input_shape"]),
            "bytes": model_bytes(d / "model.onnx"), "score": sc["score"], "parity": par}


def _run_torch_steps(cfg, store, work: Path, data: _Data, quiet: bool, log) -> tuple[Path, list[dict], object, list[str]]:
    """Run prune/distill/sparsity in order; return (onnx path, step records, final model, notes)."""
    from edgecli.compression import TorchContext
    from edgecli.compression.quantize import time_p50
    from edgecli.models import build_from_info, load_weights_into, trusted_archs, trusted_info
    from edgecli.training import load_weights_file

    man = store.manifest("train")
    info = man.get("model_info")
    if not info:
        raise ArtifactError("train manifest has no model_info; rerun `edgecli train -c <config> --force`")
    info = trusted_info(info, trusted_archs(cfg), str(store.stage_dir("train") / "manifest.json"))
    model = build_from_info(info)
    wpath = store.require("train", "weights.safetensors")
    load_weights_into(model, load_weights_file(wpath), info["arch"], str(wpath))
    model.eval()
    splits = data.splits
    before = _measure_torch(model, info, cfg, splits, work, "step-input", data)
    ctx = TorchContext(model=model, splits=splits, cfg=cfg, model_info=info, num_classes=info["num_classes"],
                       baseline_val_accuracy=float(man.get("metrics", {}).get("val_accuracy", before["score"])),
                       quiet=quiet, teacher_weights=wpath)
    records = []
    feed1 = {k: v[:1] for k, v in data.eval_feeds.items()}
    for i, st in enumerate(cfg.compress.steps):
        if st.kind not in TORCH_STEPS:
            break
        key = f"compress.steps.{i}"
        fn = _load_step_func(st.kind, key)
        log(f"step {i}: {st.kind}")
        details = fn(ctx, st.options) or {}
        after = _measure_torch(ctx.model, info, cfg, splits, work, f"step{i}-{st.kind}", data)
        p0, p1 = time_p50([before["dir"] / "model.onnx", after["dir"] / "model.onnx"], feed1, cfg.compress.threads)
        before["p50_ms"], after["p50_ms"] = p0, p1
        records.append({"index": i, "kind": st.kind, "options": st.options.model_dump(mode="json"),
                        "before": _public(before), "after": _public(after), "details": _jsonable(details),
                        "metric": data.metric})
        before = after
    return before["dir"], records, ctx.model, list(ctx.notes)


def _public(m: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items() if k not in ("dir", "parity")}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# --------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False) -> StageResult:
    """Compose cfg.compress.steps on the configured input and publish the chosen model."""
    from edgecli.artifacts import STAGES
    from edgecli.report import info as log_info

    check_steps(cfg, from_stage=cfg.compress.input in STAGES)  # config mistakes first, before any file
    state: dict = {}
    log = (lambda m: None) if quiet else (lambda m: log_info(f"compress: {m}"))

    def fp():  # called with the run lock held: the input cannot change under us
        state["input"] = _input_ref(cfg, store)
        return declare(cfg, *state["input"])

    def build(w: StageWriter):
        stage, src_path = state["input"]
        with _temp_dir("compress") as tmp:
            return _build(cfg, store, w, Path(tmp), stage, src_path, state, quiet, log)

    res = run_stage(store, STAGE, fp, force, build, command="edgecli compress")
    from edgecli.stages import stale_upstream_notes

    res.messages += stale_upstream_notes(cfg, store, ("train",))
    return _result(res, state, store)


def _build(cfg, store, w: StageWriter, work: Path, stage, src_path: Path, state: dict, quiet: bool, log):
    import onnx

    from edgecli.compression.quantize import QuantizeJob, Scorer
    from edgecli.onnxio import get_metadata, inputs_of, load_onnx, model_bytes, parse_model_info, set_metadata
    from edgecli.runtimes.feeds import load_input_file, n_samples

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
    steps = cfg.compress.steps
    q_idx = [i for i, s in enumerate(steps) if s.kind == "quantize"]
    # inputs for fidelity scoring when the pipeline's data does not fit an external model
    file_feeds = None
    for i in q_idx:
        if steps[i].quantize.calibration.data:
            file_feeds = load_input_file(Path(steps[i].quantize.calibration.data), inputs,
                                         f"compress.steps.{i}.quantize.calibration.data")
            break
    src_info = man.get("model_info") if man else parse_model_info(meta.get("edgecli.model_info"), str(src_path))
    data = _eval_data(cfg, inputs, file_feeds, src, src_info)
    notes = [n for n in (data.fit_note, data.kind_note) if n]
    records: list[dict] = []
    torch_model = None
    cur = src
    points = [("input", src)]  # what the final latency check may fall back to
    meta_input = dict(meta)
    if any(s.kind in TORCH_STEPS for s in steps):
        if data.splits is None:
            raise DataError("compress: PyTorch steps need the pipeline's dataset, which does not fit the model")
        tdir, trec, torch_model, tnotes = _run_torch_steps(cfg, store, work, data, quiet, log)
        records += trec
        notes += tnotes
        cur = tdir / "model.onnx"
        points.append(("after torch steps", cur))
        meta.update(get_metadata(cur))
    # outputs of the FP32 model that quantization starts from: top-1 agreement and cosine for every
    # candidate, and the score itself when no labels fit
    reference = Scorer(data.eval_feeds, None, cfg.compress.threads).outputs(cur)
    if cfg.compress.transformer_optimize:
        info = man.get("model_info") if man else parse_model_info(meta.get("edgecli.model_info"), str(src_path))
        cur, fusion = _fuse(cfg, info, cur, work, data, reference, log)
        records.append(fusion)
    scorer = Scorer(data.eval_feeds, data.labels, cfg.compress.threads, reference=reference, embedding=data.embedding)
    feed1 = {k: v[:1] for k, v in data.eval_feeds.items()}
    outcomes = []
    for i in q_idx:
        key = f"compress.steps.{i}.quantize"
        opts = steps[i].quantize
        calib, problem, calib_src = _calibration(cfg, opts, key, inputs, data)
        if opts.mode == "static" and calib is None:
            raise DataError(problem)
        sw = work / f"step{i}"
        sw.mkdir()
        log(f"step {i}: quantize (mode {opts.mode}, objective {cfg.compress.objective})")
        job = QuantizeJob(cur, sw, opts, scorer=scorer, calib=calib, calib_problem=problem, feed1=feed1,
                          threads=cfg.compress.threads, max_drop=cfg.compress.max_accuracy_drop,
                          objective=cfg.compress.objective, key=key, log=log, min_cosine=cfg.compress.min_cosine)
        out = job.run()
        outcomes.append(out)
        base, ch = out.input, out.chosen
        after = ch or base
        rec = {
            "index": i, "kind": "quantize", "options": opts.model_dump(mode="json"), "metric": data.metric,
            "calibration": calib_src or None,
            "before": {"bytes": base.bytes, "score": _r(base.score), "p50_ms": _r(base.p50_ms)},
            "after": {"bytes": after.bytes, "score": _r(after.score), "p50_ms": _r(after.p50_ms)},
            "verdict": out.verdict, "failed_constraint": out.failed_constraint,
            "chosen": ch.name if ch else None,
            "candidates": [base.to_json(None, None)] + [c.to_json(base.score, base.p50_ms) for c in out.candidates],
            "sensitivity": out.sensitivity, "notes": out.notes,
        }
        records.append(rec)
        if ch is not None:
            cur = ch.path
        elif out.best_rejected is not None:
            state["best_rejected"] = (i, out.best_rejected)
    forced = any(steps[i].quantize.force for i in q_idx)
    confirmation = None
    if cfg.compress.objective == "latency" and cfg.compress.confirm_repeats and cur != src and not forced:
        from edgecli.compression.confirm import confirm_choice
        from edgecli.compression.quantize import MIN_SPEEDUP

        log(f"confirming the choice with bench's protocol ({cfg.compress.confirm_repeats} fresh processes per model)")
        confirmation = confirm_choice(points + [("compress choice", cur)], feed1, cfg.compress.threads,
                                      repeats=cfg.compress.confirm_repeats, min_speedup=MIN_SPEEDUP, tmp=work)
        pick = (points + [("compress choice", cur)])[confirmation["chosen_index"]][1]
        if pick != cur:
            notes.append(f"latency check ({confirmation['protocol']}): {confirmation['reason']}")
            cur = pick
            if cur == src:
                torch_model, meta = None, meta_input
    # publish: the model, its metadata, weights of the torch model, the report
    shutil.copyfile(cur, w.path("model.onnx"))
    if "edgecli.model_info" not in meta and data.splits is not None:
        # an external model scored on the pipeline's data: record that preprocessing so infer can feed it
        meta["edgecli.model_info"] = json.dumps({
            "arch": "external", "args": {}, "num_classes": data.splits.num_classes,
            "class_names": data.splits.class_names, "kind": data.splits.kind,
            "input_shape": data.splits.spec.input_shape, "input_names": [i.name for i in inputs],
            "output_names": [o.name for o in onnx.load(str(src), load_external_data=False).graph.output],
            "preprocess": data.splits.spec.to_dict()}, sort_keys=True)
    lineage = {"input": cfg.compress.input, "steps": [r["kind"] for r in records],
               "chosen": [r.get("chosen") for r in records if r["kind"] == "quantize"]}
    set_metadata(w.path("model.onnx"), {**meta, "edgecli.compress": lineage, "edgecli.version": __version__})
    extra: dict = {}
    if torch_model is not None:
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().clone() for k, v in torch_model.cpu().state_dict().items()}
        save_file(sd, str(w.path("weights.safetensors")))
        extra["state_dict_shapes"] = {k: list(v.shape) for k, v in sd.items()}
        extra["weights_note"] = "weights.safetensors is the PyTorch model after the torch steps, before quantization"
    elif stage:
        shutil.copyfile(store.require(stage, "weights.safetensors"), w.path("weights.safetensors"))
        extra["weights_note"] = "weights.safetensors is the trained FP32 model (no torch step ran)"
    if "best_rejected" in state:
        i, c = state["best_rejected"]
        shutil.copyfile(c.path, w.path("candidate_best.onnx"))
        set_metadata(w.path("candidate_best.onnx"), {**meta, "edgecli.compress": {"rejected": c.name}})
        notes.append(f"step {i}: kept the FP32 input; the best rejected candidate ({c.name}, failed "
                     f"{', '.join(c.failed) or 'build'}) is in candidate_best.onnx for inspection")
    first = records[0]["before"] if records else {}
    final_bytes = model_bytes(w.path("model.onnx"))
    input_bytes = model_bytes(src_path)  # as the user holds it, external data included
    # torch steps report theirs in details (e.g. prune back-off that never held the drop)
    q_fails = [r.get("failed_constraint") or (r.get("details") or {}).get("failed_constraint") for r in records]
    q_fails = [f for f in q_fails if f]
    fin = records[-1]["after"] if records else {}
    if confirmation is not None and confirmation["chosen_index"] == 0:
        fin = first
    report = {
        "input": {"ref": cfg.compress.input, "bytes": input_bytes, "score": first.get("score"),
                  "p50_ms": first.get("p50_ms"), "inputs": [s.describe() for s in inputs]},
        "metric": data.metric, "objective": cfg.compress.objective,
        "max_accuracy_drop": cfg.compress.max_accuracy_drop, "threads": cfg.compress.threads,
        "guard": ({"min_cosine": cfg.compress.min_cosine} if data.embedding
                  else {"max_accuracy_drop": cfg.compress.max_accuracy_drop}),
        "metric_reason": data.kind_note,
        "eval_samples": int(n_samples(data.eval_feeds)), "steps": records,
        "final": {"bytes": final_bytes, "size_ratio": round(final_bytes / input_bytes, 5),
                  "score": fin.get("score"), "p50_ms": fin.get("p50_ms")},
        "failed_constraint": q_fails[-1] if q_fails else None,
        "latency_confirmation": confirmation,
        "verdict": "; ".join([r["verdict"] for r in records if "verdict" in r]
                             + ([confirmation["reason"]] if confirmation and confirmation["chosen_index"] != len(points)
                                else [])) or "torch steps only",
        "notes": notes,
    }
    write_json_atomic(w.path("report.json"), report)
    state.update(report=report, notes=notes)
    model_info = man.get("model_info") if man else parse_model_info(meta.get("edgecli.model_info"), str(src_path))
    extra.update(model_info=model_info, seed=cfg.seed, metric=data.metric, verdict=report["verdict"])
    metrics = {"bytes": final_bytes, "size_ratio": report["final"]["size_ratio"], "metric": data.metric,
               "score": report["final"]["score"], "input_score": first.get("score"),
               "p50_ms": report["final"]["p50_ms"], "input_p50_ms": first.get("p50_ms"),
               "failed_constraint": report["failed_constraint"]}
    return cfg.section("compress"), metrics, extra


def _fuse(cfg, info, cur: Path, work: Path, data: _Data, reference, log) -> tuple[Path, dict]:
    """ONNX Runtime's transformer fusions on the FP32 model, before any quantize step.

    Quantizing first and fusing after finds nothing to fuse; fusing first lets dynamic INT8 run the
    fused Attention and quantized MatMuls (MEASURED: 0.54x PyTorch eager vs 0.98x unfused).
    """
    from edgecli.compression.quantize import Scorer, time_p50, transformer_dims, transformer_fuse
    from edgecli.onnxio import model_bytes

    heads, hidden, src = transformer_dims(info, cfg.compress.num_heads, cfg.compress.hidden_size)
    log(f"transformer fusion (bert, {heads} heads, hidden {hidden} from {src})")
    dst = work / "fused.onnx"
    try:
        counts = transformer_fuse(cur, dst, heads, hidden)
    except Exception as e:  # noqa: BLE001 - the optimizer fails in many ways on graphs it does not know
        raise DataError(f"compress.transformer_optimize: ONNX Runtime's transformer optimizer failed on this model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
        raise DataError(f"compress.transformer_optimize: no attention was fused ({counts or 'nothing fused'}); check "
                        f"compress.num_heads/hidden_size ({heads}/{hidden}) and export with the TorchScript exporter")
    sc = Scorer(data.eval_feeds, data.labels, cfg.compress.threads, reference=reference, embedding=data.embedding)
    before, after = sc.score(cur), sc.score(dst)
    if after.get("cosine_min", 0.0) < 0.999:
        raise DataError(f"compress.transformer_optimize: the fused model disagrees with its input (min cosine "
                        f"{after.get('cosine_min', 0.0):.4f}); set compress.transformer_optimize: false")
    feed1 = {k: v[:1] for k, v in data.eval_feeds.items()}
    p0, p1 = time_p50([cur, dst], feed1, cfg.compress.threads)
    rec = {"index": -1, "kind": "transformer_optimize", "metric": data.metric,
           "options": {"model_type": "bert", "num_heads": heads, "hidden_size": hidden, "dims_from": src},
           "fused_ops": counts,
           "before": {"bytes": model_bytes(cur), "score": _r(before["score"]), "p50_ms": _r(p0)},
           "after": {"bytes": model_bytes(dst), "score": _r(after["score"]), "p50_ms": _r(p1),
                     "cosine_min": _r(after.get("cosine_min"))}}
    return dst, rec


def _r(x, n=5):
    return None if x is None else round(float(x), n)


def _result(res: StageResult, state: dict, store: ArtifactStore) -> StageResult:
    report = state.get("report")
    if report is None and res.dir is not None and (res.dir / "report.json").is_file():
        report = json.loads((res.dir / "report.json").read_text())
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
    res.messages = list(state.get("notes", [])) + res.messages
    return res
