"""The compress stage's chain of steps on local files: torch steps, quantize steps, the latency check.

The stage resolves and records its input and publishes the result; everything between runs here on
a ``ChainState``: the current model, the step records and notes, and what the final latency check
may fall back to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgecli.compression import rounded
from edgecli.compression.evaldata import EvalData, calibration
from edgecli.compression.torchsteps import run_torch_steps
from edgecli.errors import DataError


@dataclass
class ChainState:
    """What one compress run carries from phase to phase."""

    src: Path  # the self-contained FP32 copy of the input
    inputs: list  # its InputSpecs
    info: dict | None  # the input's model_info (train manifest or ONNX metadata), read once
    meta: dict  # the ONNX metadata the published model carries
    data: EvalData
    files: dict  # calibration.data files, read once
    cur: Path = field(init=False)  # the model so far
    meta_input: dict = field(init=False)  # ``meta`` as the input had it
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(init=False)
    points: list = field(init=False)  # what the final latency check may fall back to
    torch_model: object = None
    confirmation: dict | None = None
    best_rejected: tuple | None = None  # (step index, Candidate)

    def __post_init__(self):
        self.cur = self.src
        self.meta_input = dict(self.meta)
        self.points = [("input", self.src)]
        self.notes = [n for n in (self.data.fit_note, self.data.kind_note) if n]


def torch_phase(cfg, store, work: Path, run: ChainState, quiet: bool, log) -> None:
    from edgecli.onnxio import get_metadata

    if run.data.splits is None:
        raise DataError("compress: PyTorch steps need the pipeline's dataset, which does not fit the model")
    tdir, trec, run.torch_model, tnotes = run_torch_steps(cfg, store, work, run.data, quiet, log)
    run.records += trec
    run.notes += tnotes
    run.cur = tdir / "model.onnx"
    run.points.append(("after torch steps", run.cur))
    run.meta.update(get_metadata(run.cur))


def quantize_phase(cfg, work: Path, run: ChainState, reference, log) -> None:
    from edgecli.compression.quantize import QuantizeJob, Scorer
    from edgecli.compression.quantize_modes import MODES

    data, steps = run.data, cfg.compress.steps
    scorer = Scorer(data.eval_feeds, data.labels, cfg.compress.threads, reference=reference, embedding=data.embedding)
    feed1 = {k: v[:1] for k, v in data.eval_feeds.items()}
    for i in [i for i, s in enumerate(steps) if s.kind == "quantize"]:
        key = f"compress.steps.{i}.quantize"
        opts = steps[i].quantize
        calib, problem, calib_src = calibration(cfg, opts, key, run.inputs, data, run.files)
        mode = MODES.get(opts.mode)  # None: auto, whose static candidates say the same when they are built
        if mode is not None and mode.needs_calibration and calib is None:
            raise DataError(problem)
        sw = work / f"step{i}"
        sw.mkdir()
        log(f"step {i}: quantize (mode {opts.mode}, objective {cfg.compress.objective})")
        job = QuantizeJob(run.cur, sw, opts, scorer=scorer, calib=calib, calib_problem=problem, feed1=feed1,
                          threads=cfg.compress.threads, max_drop=cfg.compress.max_accuracy_drop,
                          objective=cfg.compress.objective, key=key, log=log, min_cosine=cfg.compress.min_cosine)
        out = job.run()
        run.records.append(quantize_record(i, opts, data.metric, calib_src, out))
        if out.chosen is not None:
            run.cur = out.chosen.path
        elif out.best_rejected is not None:
            run.best_rejected = (i, out.best_rejected)


def quantize_record(i: int, opts, metric: str, calib_src: str, out) -> dict:
    base, ch = out.input, out.chosen
    after = ch or base
    return {
        "index": i, "kind": "quantize", "options": opts.model_dump(mode="json"), "metric": metric,
        "calibration": calib_src or None,
        "before": {"bytes": base.bytes, "score": rounded(base.score), "p50_ms": rounded(base.p50_ms)},
        "after": {"bytes": after.bytes, "score": rounded(after.score), "p50_ms": rounded(after.p50_ms)},
        "verdict": out.verdict, "failed_constraint": out.failed_constraint,
        "chosen": ch.name if ch else None,
        "candidates": [base.to_json(None, None)] + [c.to_json(base.score, base.p50_ms) for c in out.candidates],
        "sensitivity": out.sensitivity, "notes": out.notes,
    }


def confirm_phase(cfg, work: Path, run: ChainState, log) -> None:
    """Under the latency objective, check the choice with bench's protocol (fresh processes)."""
    forced = any(s.quantize.force for s in cfg.compress.steps if s.kind == "quantize")
    if not (cfg.compress.objective == "latency" and cfg.compress.confirm_repeats and run.cur != run.src
            and not forced):
        return
    from edgecli.compression.confirm import confirm_choice
    from edgecli.compression.quantize import MIN_SPEEDUP

    log(f"confirming the choice with bench's protocol ({cfg.compress.confirm_repeats} fresh processes per model)")
    feed1 = {k: v[:1] for k, v in run.data.eval_feeds.items()}
    points = run.points + [("compress choice", run.cur)]
    run.confirmation = confirm_choice(points, feed1, cfg.compress.threads, repeats=cfg.compress.confirm_repeats,
                                      min_speedup=MIN_SPEEDUP, tmp=work)
    pick = points[run.confirmation["chosen_index"]][1]
    if pick != run.cur:
        run.notes.append(f"latency check ({run.confirmation['protocol']}): {run.confirmation['reason']}")
        run.cur = pick
        if run.cur == run.src:
            run.torch_model, run.meta = None, run.meta_input


def external_info(run: ChainState) -> dict:
    import onnx

    s = run.data.splits
    return json.loads(json.dumps({
        "arch": "external", "args": {}, "num_classes": s.num_classes, "class_names": s.class_names, "kind": s.kind,
        "input_shape": s.spec.input_shape, "input_names": [i.name for i in run.inputs],
        "output_names": [o.name for o in onnx.load(str(run.src), load_external_data=False).graph.output],
        "preprocess": s.spec.to_dict()}, sort_keys=True))


def build_report(cfg, run: ChainState, final_bytes: int, input_bytes: int) -> dict:
    """report.json: the input (as the user holds it, external data included), every step, the final model."""
    from edgecli.runtimes.feeds import n_samples

    records, confirmation, data = run.records, run.confirmation, run.data
    first = records[0]["before"] if records else {}
    # torch steps report theirs in details (e.g. prune back-off that never held the drop)
    q_fails = [r.get("failed_constraint") or (r.get("details") or {}).get("failed_constraint") for r in records]
    q_fails = [f for f in q_fails if f]
    fin = records[-1]["after"] if records else {}
    if confirmation is not None and confirmation["chosen_index"] == 0:
        fin = first
    return {
        "input": {"ref": cfg.compress.input, "bytes": input_bytes, "score": first.get("score"),
                  "p50_ms": first.get("p50_ms"), "inputs": [s.describe() for s in run.inputs]},
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
                             + ([confirmation["reason"]] if confirmation and confirmation["chosen_index"] != len(run.points)
                                else [])) or "torch steps only",
        "notes": run.notes,
    }
