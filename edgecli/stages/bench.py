"""bench: side-by-side measurement of every model, each in a fresh process; budgets for CI.

What is measured (see edgecli/benchworker.py for the order inside one worker): cold start
(session creation + first inference), p50/p90/p95/p99/mean/std latency of ``sess.run`` alone per
batch size and thread count, throughput, peak resident memory, file size (with external data),
and accuracy (and macro P/R/F1) on the test split. A PyTorch eager baseline from the trained
weights is measured the same way, so every row says what the ONNX path bought.

bench always reruns: its results are measurements of this machine at this moment, not a function
of config and inputs, so skipping as "up to date" would show stale numbers (and a CI job that
checks budgets must measure). ``--force`` is accepted and changes nothing.

Outputs in ``<run>/bench/``: results.json (every raw latency too), results.md (also appended to
``$GITHUB_STEP_SUMMARY`` when set) and pareto.png. Broken budgets are reported after the results
are published (so CI can upload them) and make the command exit 1.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecli.artifacts import (
    ArtifactStore,
    Declared,
    StageWriter,
    write_json_atomic,
)
from edgecli.config import PipelineConfig, did_you_mean
from edgecli.errors import ArtifactError, CheckFailed, ConfigError, ModelFileError, UsageError
from edgecli.runtimes.env import environment
from edgecli.stages import StageResult, Table, resolve_input, run_stage

STAGE = "bench"
MODEL_STAGES = ("train", "compress", "export")
TORCH_LABEL = "pytorch"
RESULTS_VERSION = 1
DEFAULT_MAX_REGRESSION = 0.10


@dataclass
class Target:
    """One model to measure: an ONNX file, or the PyTorch eager baseline (weights + architecture)."""

    label: str
    kind: str  # "onnx" | "torch"
    path: Path
    stage: str | None
    info: dict | None
    size_bytes: int
    runtime: dict | None = None  # kind "runtime": backend, precision, input names (edgecli.runtimes.targets)


# --------------------------------------------------------------------------- what to measure


def select_targets(cfg: PipelineConfig, store: ArtifactStore) -> tuple[list[Target], list[str]]:
    """The models to bench, in table order (PyTorch baseline first); plus notes for the user."""
    from edgecli.onnxio import model_bytes, model_info_from_onnx

    refs = list(cfg.bench.models) or [s for s in MODEL_STAGES if store.exists(s)]
    if not refs:
        raise ArtifactError(
            f"bench: none of {', '.join(MODEL_STAGES)} has been run for '{store.name}' and bench.models is empty",
            hint="run `edgecli train -c <config>` first, or list .onnx files in bench.models",
        )
    dups = sorted({r for r in refs if refs.count(r) > 1})
    if dups:
        raise ConfigError(f"bench.models: {', '.join(dups)} listed more than once")
    targets: list[Target] = []
    for ref in refs:
        stage, path = resolve_input(store, ref, MODEL_STAGES, "bench.models")
        label = stage or path.stem
        if label in {t.label for t in targets} or label == TORCH_LABEL:
            label = str(path)
        targets.append(Target(label, "onnx", path, stage, model_info_from_onnx(path), model_bytes(path)))

    notes: list[str] = []
    if any(t.stage == "export" for t in targets):  # one row per LiteRT / ExecuTorch / OpenVINO target too
        from edgecli.runtimes.targets import bench_entries

        entries, rnotes = bench_entries(store.stage_dir("export"), cfg.bench.runtimes)
        notes += rnotes
        info = next(t.info for t in targets if t.stage == "export")
        targets += [Target(e["label"], "runtime", e["path"], "export", info, e["bytes"], e) for e in entries]
    if cfg.bench.torch_baseline:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            notes.append("PyTorch baseline skipped: torch is not installed")
        elif not store.exists("train"):
            notes.append(f"PyTorch baseline skipped: no train stage in {store.run_dir} (its weights are the baseline)")
        else:
            weights = store.require("train", "weights.safetensors")
            info = store.manifest("train").get("model_info")
            if info is None:
                from edgecli.onnxio import model_info_from_onnx as _mi

                info = _mi(store.require("train", "model.onnx"))
            if not info or (isinstance(info, dict) and info.get("kind") == "text"
                            and len(info.get("input_names") or []) < 2):
                notes.append("PyTorch baseline skipped: the train stage does not describe a single-input model")
            else:
                from edgecli.models import trusted_archs, trusted_info

                # the baseline imports the architecture the manifest names: only one the config names too
                info = trusted_info(info, trusted_archs(cfg), str(store.stage_dir("train") / "manifest.json"))
                targets.insert(0, Target(TORCH_LABEL, "torch", weights, "train", info, weights.stat().st_size))
    return targets, notes


# --------------------------------------------------------------------------- inputs for the workers


def _write_inputs(cfg: PipelineConfig, targets: list[Target], tmp: Path) -> tuple[dict[str, str | None], str | None, int, list[str]]:
    """Preprocess the test split once per distinct preprocessing spec; (x path per label, y path, classes, notes)."""
    from edgecli.data import load_splits
    from edgecli.data.preprocess import PreprocessSpec
    from edgecli.errors import DataError

    splits = load_splits(cfg)
    test = splits.test
    notes: list[str] = []
    if isinstance(test.x, dict):
        # text: the tokenizer's arrays, one per model input; the worker trims each timed batch to
        # its own longest sentence, as infer does, and records that sequence length
        y_path = tmp / "y.npy"
        np.save(y_path, np.asarray(test.y, dtype=np.int64))
        x_path = tmp / "x0.npz"
        np.savez(x_path, **{k: np.ascontiguousarray(v) for k, v in test.x.items()})
        return {t.label: str(x_path) for t in targets}, str(y_path), splits.num_classes, notes
    if not isinstance(test.x, np.ndarray) or not np.issubdtype(test.x.dtype, np.number):
        notes.append("the test split is not a numeric array: models are timed on synthetic inputs, accuracy not measured")
        return {t.label: None for t in targets}, None, splits.num_classes, notes
    y_path = tmp / "y.npy"
    np.save(y_path, np.asarray(test.y, dtype=np.int64))
    own = json.dumps(splits.spec.to_dict(), sort_keys=True)
    cache: dict[str, str] = {}

    def save(key: str, x: np.ndarray) -> str:
        if key not in cache:
            p = tmp / f"x{len(cache)}.npy"
            np.save(p, np.ascontiguousarray(x))
            cache[key] = str(p)
        return cache[key]

    xs: dict[str, str | None] = {}
    for t in targets:
        pre = (t.info or {}).get("preprocess")
        key = json.dumps(pre, sort_keys=True) if pre else own
        if key == own:
            xs[t.label] = save(own, test.x)
            continue
        try:  # a model from another pipeline: apply the preprocessing it was trained with
            spec = PreprocessSpec.from_dict(pre)
            spec.check_raw(test.raw, "test split")
            xs[t.label] = save(key, spec.apply(test.raw))
        except (DataError, TypeError, ValueError, KeyError):
            notes.append(f"{t.label}: its preprocessing does not apply to this pipeline's data; using the pipeline's")
            xs[t.label] = save(own, test.x)
    return xs, str(y_path), splits.num_classes, notes


# --------------------------------------------------------------------------- workers


def run_worker(spec: dict, tmp: Path, label: str) -> dict:
    """Measure in a fresh ``python -m edgecli.benchworker`` process; return its result dict."""
    idx = len(list(tmp.glob("spec*.json")))
    sp, op = tmp / f"spec{idx}.json", tmp / f"out{idx}.json"
    from edgecli.runtimes.worker import launch

    res = launch(spec, sp, op, f"bench: the worker measuring {label}",
                 omp_threads=spec["threads"] if spec["kind"] == "torch" else None)
    if not res.get("ok"):
        if os.environ.get("EDGECLI_DEBUG"):
            print(res.get("traceback", ""), file=sys.stderr)
        if res.get("user_error"):
            raise ModelFileError(f"bench: {label}: {res['error']}")
        raise CheckFailed(f"bench: measuring {label} failed: {res['error']}")
    return res


def _where_ran(t: Target, prov: str) -> str:
    """The provider column: the ORT provider, or the runtime and precision of a runtime target."""
    return f"{t.runtime['runtime']} {t.runtime['precision']}" if t.runtime else short_provider(prov)


def latency_stats(lat_ns: list[int], batch: int) -> dict:
    """Percentiles in ms of the timed runs; throughput = samples over the summed run time."""
    a = np.asarray(lat_ns, dtype=np.float64) / 1e6
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
        "mean_ms": float(a.mean()), "std_ms": float(a.std()), "min_ms": float(a.min()), "max_ms": float(a.max()),
        "runs": int(len(a)), "throughput_sps": float(batch * len(a) / (a.sum() / 1e3)) if a.sum() > 0 else None,
    }


def short_provider(p: str) -> str:
    return p[: -len("ExecutionProvider")] if p.endswith("ExecutionProvider") else p


def _merge_repeats(runs: list[dict]) -> dict:
    """One worker result from ``bench.repeats`` fresh-process results of the same measurement.

    Timed runs are pooled (results.json keeps every one, and each process's p50 and p95); cold-start and
    import times are the median process's; peak memory is the largest (budgets stay conservative);
    accuracy comes from the first process, the only one that scores (the model is deterministic).
    """
    first = runs[0]
    res = dict(first)
    for k in ("import_ms", "load_ms", "first_ms"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        res[k] = float(np.median(vals)) if vals else None
    for k in ("peak_rss_kb", "rss_before_load_kb"):
        res[k] = max(r[k] for r in runs)
    batches = []
    for i, b in enumerate(first["batches"]):
        if "skipped" in b:
            batches.append(b)
            continue
        per = [r["batches"][i]["latencies_ns"] for r in runs]
        batches.append({**b, "latencies_ns": [x for lat in per for x in lat],
                        "p50_per_process_ms": [float(np.percentile(lat, 50)) / 1e6 for lat in per],
                        "p95_per_process_ms": [float(np.percentile(lat, 95)) / 1e6 for lat in per]})
    res["batches"] = batches
    return res


def measure(cfg: PipelineConfig, targets: list[Target], providers: list[str], quiet: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(rows, measurements, notes): ``bench.repeats`` fresh workers per model x provider x thread count.

    The repeats run in interleaved order (every model once, then every model again...), so drift in
    machine load hits all models alike, and per-process effects (which core, memory placement:
    30-50% on sub-millisecond models here) average out instead of deciding a comparison.
    """
    from edgecli.report import info

    bc = cfg.bench
    rows: list[dict] = []
    measurements: list[dict] = []
    from edgecli.safeio import temp_dir

    with temp_dir("bench") as td:  # named by pid: the next run removes it should this one be SIGKILLed
        tmp = Path(td)
        xs, y_path, num_classes, notes = _write_inputs(cfg, targets, tmp)
        jobs = []
        for t in targets:
            for prov in (["CPUExecutionProvider"] if t.kind in ("torch", "runtime") else providers):
                for threads in bc.threads:
                    spec = {
                        "kind": t.kind, "model": str(t.path), "weights": str(t.path), "model_info": t.info,
                        "providers": [prov], "threads": threads, "batch_sizes": list(bc.batch_sizes),
                        "warmup": bc.warmup, "runs": bc.runs, "min_time_s": bc.min_time_s,
                        "x": xs.get(t.label), "y": y_path, "accuracy_samples": bc.accuracy_samples,
                        "num_classes": (t.info or {}).get("num_classes") or num_classes,
                    }
                    if t.runtime:
                        spec.update(backend=t.runtime["runtime"], precision=t.runtime["precision"],
                                    input_names=t.runtime["input_names"], embedder=t.runtime["embedder"])
                    if t.kind == "torch" and spec["x"] is None:
                        notes.append("PyTorch baseline skipped: the test split is not a numeric array")
                        continue
                    jobs.append((t, prov, threads, spec))
        results: list[list[dict]] = [[] for _ in jobs]
        for rep in range(bc.repeats):
            for j, (t, prov, threads, spec) in enumerate(jobs):
                if not quiet:
                    of = f" [process {rep + 1}/{bc.repeats}]" if bc.repeats > 1 else ""
                    info(f"bench: {t.label} on {short_provider(prov)}, {threads} thread(s){of}")
                # only the first process scores accuracy: the others would repeat the same numbers
                results[j].append(run_worker(spec if rep == 0 else {**spec, "y": None}, tmp, t.label))
        if bc.repeats > 1:
            notes.append(f"latencies pooled over {bc.repeats} fresh processes per model, run in interleaved order "
                         "(results.json keeps each process's p50 and p95)")
        for (t, prov, threads, _), runs in zip(jobs, results, strict=True):
            res = _merge_repeats(runs)
            if t.kind == "onnx" and prov not in res["providers_used"]:
                notes.append(f"{t.label}: {short_provider(prov)} did not take the model; it ran on "
                             f"{', '.join(short_provider(p) for p in res['providers_used'])}")
            if res.get("accuracy_note"):
                notes.append(f"{t.label}: timed on synthetic inputs, accuracy not measured ({res['accuracy_note']})")
            acc = (res.get("metrics") or {}).get("accuracy")
            m = {
                "model": t.label, "kind": t.kind, "provider": _where_ran(t, prov), "threads": threads,
                "providers_used": res["providers_used"], "processes": len(runs), "import_ms": res["import_ms"],
                "load_ms": res["load_ms"], "first_inference_ms": res["first_ms"],
                "cold_start_ms": (res["load_ms"] + res["first_ms"]) if res["first_ms"] is not None else None,
                "peak_memory_mb": res["peak_rss_kb"] / 1024,
                "rss_before_load_mb": res["rss_before_load_kb"] / 1024,
                "peak_memory_with_accuracy_mb": res["peak_rss_with_accuracy_kb"] / 1024,
                "torch_imported": res["torch_imported"], "synthetic_inputs": res["synthetic_inputs"],
                "accuracy_note": res.get("accuracy_note"), "metrics": res.get("metrics"),
            }
            measurements.append(m)
            for b in res["batches"]:
                if "skipped" in b:
                    notes.append(f"{t.label}: batch {b['batch']} skipped ({b['skipped']})")
                    continue
                rows.append({
                    "model": t.label, "kind": t.kind, "stage": t.stage, "path": str(t.path),
                    "provider": _where_ran(t, prov), "batch": b["batch"], "threads": threads,
                    "size_bytes": t.size_bytes, "accuracy": acc,
                    **latency_stats(b["latencies_ns"], b["batch"]),
                    "p50_per_process_ms": b["p50_per_process_ms"], "p95_per_process_ms": b["p95_per_process_ms"],
                    "peak_memory_mb": m["peak_memory_mb"], "cold_start_ms": m["cold_start_ms"],
                    "latencies_ns": b["latencies_ns"],
                    **({"sequence": b["sequence"]} if "sequence" in b else {}),
                })
                if "sequence" in b and not any("sequence length" in n for n in notes):
                    notes.append(f"text models timed on test sentences at batch size b, padded to the "
                                 f"longest of those b (sequence length {b['sequence']} at batch {b['batch']})")
    base = {(r["batch"], r["threads"]): r["p50_ms"] for r in rows if r["kind"] == "torch"}
    for r in rows:
        ref = base.get((r["batch"], r["threads"]))
        r["speedup_vs_pytorch"] = ref / r["p50_ms"] if ref and r["p50_ms"] > 0 else None
    return rows, measurements, notes


# --------------------------------------------------------------------------- budgets and regressions


def budget_target(cfg: PipelineConfig, targets: list[Target]) -> str:
    labels = [t.label for t in targets]
    want = cfg.bench.budgets.model
    if want is None:
        onnx = [t.label for t in targets if t.kind == "onnx"]
        return onnx[-1] if onnx else labels[-1]
    if want in labels:
        return want
    hit = [t.label for t in targets if t.kind == "onnx" and want in (str(t.path), t.path.name)]
    if hit:
        return hit[0]
    raise ConfigError(f"bench.budgets.model: '{want}' is not among the benched models ({', '.join(labels)})"
                      f"{did_you_mean(want, labels)}")


def _where(r: dict, many_providers: bool) -> str:
    s = f"batch {r['batch']}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}"
    return f"{r['provider']}, {s}" if many_providers else s


def check_budgets(cfg: PipelineConfig, rows: list[dict], measurements: list[dict], target: str,
                  reference_accuracy: float | None) -> list[dict]:
    """One entry per budget and measured configuration: measured value, limit, ok."""
    b = cfg.bench.budgets
    many = len({r["provider"] for r in rows}) > 1
    mine = [r for r in rows if r["model"] == target]
    bs = b.batch_size or min(cfg.bench.batch_sizes)
    out: list[dict] = []

    def add(name, measured, limit, unit, where, ok=None):
        if ok is None:
            ok = measured is not None and measured <= limit + 1e-12
        out.append({"budget": name, "model": target, "where": where, "measured": measured, "limit": limit,
                    "unit": unit, "ok": bool(ok)})

    for name, key in (("latency_p50_ms", "p50_ms"), ("latency_p95_ms", "p95_ms")):
        limit = getattr(b, name)
        if limit is not None:
            for r in (r for r in mine if r["batch"] == bs):
                add(name, r[key], limit, "ms", _where(r, many))
    if b.size_kb is not None and mine:
        add("size_kb", mine[0]["size_bytes"] / 1024, b.size_kb, "KB", "file")
    my_meas = [m for m in measurements if m["model"] == target]
    accs = [(m, (m["metrics"] or {}).get("accuracy")) for m in my_meas]
    worst = min(accs, key=lambda ma: -1 if ma[1] is None else ma[1]) if accs else (None, None)
    if b.accuracy_min is not None:
        add("accuracy_min", worst[1], b.accuracy_min, "", "test split", ok=worst[1] is not None and worst[1] >= b.accuracy_min)
    if b.max_accuracy_drop is not None:
        drop = None if worst[1] is None or reference_accuracy is None else reference_accuracy - worst[1]
        add("max_accuracy_drop", drop, b.max_accuracy_drop, "", f"vs train accuracy {reference_accuracy:.4f}"
            if reference_accuracy is not None else "vs train")
    if b.peak_memory_mb is not None:
        for m in my_meas:
            add("peak_memory_mb", m["peak_memory_mb"], b.peak_memory_mb, "MB",
                f"{m['provider']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''}" if many
                else f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}")
    return out


def load_baseline(path: Path) -> dict:
    """An earlier results.json; clear one-line errors for anything else."""
    from edgecli.safeio import BASELINE_LIMIT, read_user_text, shown

    class _BaselineError(UsageError):
        def __init__(self, message: str, **kw):
            super().__init__(f"--baseline {message}", **kw)

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "results.json"
    text = read_user_text(p, "a bench results.json", BASELINE_LIMIT, _BaselineError)  # FIFOs, /dev/zero refused
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise UsageError(f"--baseline {shown(path)}: not a readable results.json ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise UsageError(f"--baseline {shown(path)}: not an edgecli bench results.json (no 'rows')")
    # every field compare_baseline reads, checked now: a crafted file fails before minutes of measuring
    for i, r in enumerate(data["rows"]):
        bad = None
        if not isinstance(r, dict):
            bad = "is not an object"
        elif not isinstance(r.get("model"), str):
            bad = "has no model name"
        elif r.get("p95_ms") is not None and (isinstance(r["p95_ms"], bool) or not isinstance(r["p95_ms"], (int, float))
                                              or not math.isfinite(r["p95_ms"]) or r["p95_ms"] <= 0):
            bad = "has a p95_ms that is not a positive number"
        elif not all(isinstance(r.get(k), (str, int, type(None))) and not isinstance(r.get(k), bool)
                     for k in ("provider", "batch", "threads")):
            bad = "has a provider, batch or threads of the wrong type"
        if bad:
            raise UsageError(f"--baseline {shown(path)}: rows[{i}] {bad}; not an edgecli bench results.json")
    if data.get("pipeline") is not None and not isinstance(data["pipeline"], str):
        raise UsageError(f"--baseline {shown(path)}: 'pipeline' is not a string")
    return data


def compare_baseline(rows: list[dict], baseline: dict, target: str, max_regression: float) -> dict:
    """p95 of every row matched (model, provider, batch, threads) with the baseline; the target's rows are checked.

    A p95 beyond ``max_regression`` is not counted as a regression when one of this run's own
    processes (``bench.repeats``) measured a p95 at or below the baseline's: the change is then
    within what this machine varies between two processes of the same model, not a slower model.
    """
    old = {(r.get("model"), r.get("provider"), r.get("batch"), r.get("threads")): r for r in baseline["rows"]}
    cmp = []
    for r in rows:
        o = old.get((r["model"], r["provider"], r["batch"], r["threads"]))
        if not o or not o.get("p95_ms"):
            continue
        change = r["p95_ms"] / o["p95_ms"] - 1.0
        checked = r["model"] == target
        per = r.get("p95_per_process_ms") or []
        noise = change > max_regression and len(per) > 1 and min(per) <= o["p95_ms"]
        cmp.append({"model": r["model"], "provider": r["provider"], "batch": r["batch"], "threads": r["threads"],
                    "baseline_p95_ms": o["p95_ms"], "p95_ms": r["p95_ms"], "change": change, "checked": checked,
                    "p95_process_range_ms": [min(per), max(per)] if per else None, "within_noise": noise,
                    "ok": (change <= max_regression or noise) if checked else True})
    return {"max_regression": max_regression, "rows": cmp,
            "checked_rows": sum(c["checked"] for c in cmp), "ok": all(c["ok"] for c in cmp)}


def regression_verdict(c: dict) -> str:
    if not c["checked"]:
        return "not checked"
    if c["within_noise"]:
        lo, hi = c["p95_process_range_ms"]
        return f"ok (noise: processes {fmt_ms(lo)}-{fmt_ms(hi)})"
    return "ok" if c["ok"] else "REGRESSED"


# --------------------------------------------------------------------------- formatting (table and Markdown share it)


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if 0 < v < 0.001:  # only budgets get this small; "0.0000" would hide the limit
        return f"{v:.2g}"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def fmt_size(n: int | float) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def fmt_acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def fmt_tp(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table_columns(many_providers: bool) -> list[str]:
    cols = ["model", "batch", "threads", "size", "accuracy", "p50 ms", "p95 ms", "p99 ms", "samples/s",
            "peak MB", "vs pytorch"]
    return cols[:1] + ["provider"] + cols[1:] if many_providers else cols


def table_cells(r: dict, many_providers: bool) -> list[str]:
    cells = [r["model"], str(r["batch"]), str(r["threads"]), fmt_size(r["size_bytes"]), fmt_acc(r["accuracy"]),
             fmt_ms(r["p50_ms"]), fmt_ms(r["p95_ms"]), fmt_ms(r["p99_ms"]), fmt_tp(r["throughput_sps"]),
             f"{r['peak_memory_mb']:.1f}", fmt_x(r["speedup_vs_pytorch"])]
    return cells[:1] + [r["provider"]] + cells[1:] if many_providers else cells


def fmt_budget_value(v: float | None, unit: str) -> str:
    if v is None:
        return "not measured"
    if unit == "ms":
        return f"{fmt_ms(v)} ms"
    if unit in ("KB", "MB"):
        return f"{v:.1f} {unit}"
    return f"{v:.4f}"


def env_line(env: dict) -> str:
    isa = env["isa"]
    flags = ", ".join(f"{k.upper().replace('AVX512', 'AVX-512')} {'yes' if v else 'no'}" for k, v in isa.items())
    v = env["versions"]
    vers = " · ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "torch", "onnx", "ai-edge-litert",
                                              "executorch", "openvino") if k in v)
    return f"{env['cpu_model']} ({env['usable_cpus']} usable CPUs; {flags}) · {vers}"


def markdown(results: dict) -> str:
    """results.md: GitHub-flavoured Markdown with the same cells as the terminal table."""
    many = results["many_providers"]
    cols = table_columns(many) + ["cold start ms"]
    lines = [f"## edgecli bench: {results['pipeline']}", "",
             f"{env_line(results['environment'])}", "",
             f"warmup {results['config']['warmup']}, at least {results['config']['runs']} timed runs per row; "
             f"latency is `sess.run` alone; each model measured in a fresh process.", "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in results["rows"]:
        lines.append("| " + " | ".join(table_cells(r, many) + [fmt_ms(r["cold_start_ms"])]) + " |")
    if results["budgets"]:
        lines += ["", f"### Budgets ({results['budget_model']})", "", "| budget | where | measured | limit | result |",
                  "|---|---|---:|---:|---|"]
        for b in results["budgets"]:
            lines.append(f"| {b['budget']} | {b['where']} | {fmt_budget_value(b['measured'], b['unit'])} | "
                         f"{fmt_budget_value(b['limit'], b['unit'])} | {'ok' if b['ok'] else '**BROKEN**'} |")
    reg = results.get("regression")
    if reg:
        lines += ["", f"### p95 vs baseline (fails beyond +{reg['max_regression']:.0%} on {results['budget_model']})", "",
                  "| model | provider | batch | threads | baseline p95 ms | p95 ms | change | result |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for c in reg["rows"]:
            res = regression_verdict(c).replace("REGRESSED", "**REGRESSED**")
            lines.append(f"| {c['model']} | {c['provider']} | {c['batch']} | {c['threads']} | {fmt_ms(c['baseline_p95_ms'])} | "
                         f"{fmt_ms(c['p95_ms'])} | {c['change']:+.1%} | {res} |")
    if results["notes"]:
        lines += [""] + [f"- {n}" for n in results["notes"]]
    if results["failures"]:
        lines += ["", "**Failed:** " + "; ".join(results["failures"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the Pareto plot


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of points no other point beats on both latency (lower) and accuracy (higher)."""
    idx = sorted(range(len(points)), key=lambda i: (points[i]["p50_ms"], -points[i]["accuracy"]))
    front, best = [], -1.0
    for i in idx:
        if points[i]["accuracy"] > best:
            front.append(i)
            best = points[i]["accuracy"]
    return front


def plot_pareto(points: list[dict], path: Path, title: str) -> None:
    """Accuracy vs p50 latency, marker area by file size, Pareto front highlighted, points labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = [p for p in points if p.get("accuracy") is not None]
    if pts:
        sizes = np.array([p["size_bytes"] for p in pts], dtype=float)
        area = 60 + 900 * np.sqrt(sizes / sizes.max())
        front = set(pareto_front(pts))
        for i, p in enumerate(pts):
            on = i in front
            face = to_rgba("tab:orange" if p["kind"] == "torch" else "tab:blue", 0.55)
            ax.scatter([p["p50_ms"]], [p["accuracy"]], s=area[i], facecolors=[face],
                       edgecolors="crimson" if on else "black", linewidths=2.2 if on else 0.6, zorder=3)
            ax.annotate(f"{p['label']}\n{fmt_ms(p['p50_ms'])} ms, {fmt_size(p['size_bytes'])}",
                        (p["p50_ms"], p["accuracy"]), textcoords="offset points", xytext=(8, 8), fontsize=8)
        fr = sorted((pts[i] for i in front), key=lambda p: p["p50_ms"])
        if len(fr) > 1:
            xs_, ys_ = [fr[0]["p50_ms"]], [fr[0]["accuracy"]]
            for p in fr[1:]:
                xs_ += [p["p50_ms"], p["p50_ms"]]
                ys_ += [ys_[-1], p["accuracy"]]
            ax.plot(xs_, ys_, color="crimson", linewidth=1.2, linestyle="--", zorder=2, label="Pareto front (red outline)")
        else:
            ax.plot([], [], color="crimson", linestyle="--", label="Pareto front (red outline)")
        lat = [p["p50_ms"] for p in pts]
        if max(lat) / max(min(lat), 1e-9) > 20:
            ax.set_xscale("log")
        lo, hi = min(p["accuracy"] for p in pts), max(p["accuracy"] for p in pts)
        pad = max((hi - lo) * 0.25, 0.005)
        ax.set_ylim(lo - pad, min(1.0 + pad / 2, hi + pad))
        ax.set_xlim(min(lat) * 0.7, max(lat) * 1.6)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no model has a measured accuracy", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("p50 latency (ms, lower is better)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))


# --------------------------------------------------------------------------- the stage


def declare(cfg: PipelineConfig, targets: list[Target]) -> Declared:
    """Recorded for lineage only: bench never skips (see the module docstring)."""
    from edgecli.stages import declare_data

    d = Declared(STAGE, {"bench": cfg.section("bench"), "data": cfg.section("data")})
    for t in targets:
        if t.stage and t.kind == "onnx":
            d.stage_input(t.stage)
        d.file(t.label if t.kind == "onnx" else f"{TORCH_LABEL}:weights", t.path)
    declare_data(d, cfg)
    return d


def _reference_accuracy(store: ArtifactStore, measurements: list[dict]) -> float | None:
    """The train model's accuracy: measured in this run when train was benched, else its manifest's."""
    for m in measurements:
        if m["model"] == "train" and m["kind"] == "onnx" and m["metrics"]:
            return m["metrics"]["accuracy"]
    if store.exists("train"):
        return store.manifest("train").get("metrics", {}).get("test_accuracy")
    return None


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False,
        baseline: Path | None = None, **_) -> StageResult:
    """Measure every model side by side, write results.json/results.md/pareto.png, check budgets."""
    from edgecli.runtimes.ort import resolve_providers

    bc = cfg.bench
    b = bc.budgets
    if b.batch_size is not None and b.batch_size not in bc.batch_sizes:
        raise ConfigError(f"bench.budgets.batch_size: {b.batch_size} is not one of bench.batch_sizes {bc.batch_sizes}")
    base_data = load_baseline(baseline) if baseline else None  # a bad file fails before minutes of measuring
    if base_data is not None and base_data.get("pipeline") not in (None, cfg.name):
        # rows match by stage name: another pipeline's numbers would compare silently and wrongly
        raise UsageError(f"--baseline {baseline}: results of pipeline '{base_data.get('pipeline')}', "
                         f"not '{cfg.name}'; compare runs of the same pipeline")
    targets, notes = select_targets(cfg, store)
    target = budget_target(cfg, targets)
    if b.max_accuracy_drop is not None and not store.exists("train") and "train" not in [t.label for t in targets]:
        raise ArtifactError("bench.budgets.max_accuracy_drop: needs the train stage's accuracy to compare with",
                            hint="run `edgecli train -c <config>` first")
    usable, skipped = resolve_providers(list(bc.providers))
    providers = [p for p in bc.providers if p in usable] or ["CPUExecutionProvider"]
    skipped_info = [{"provider": p, "reason": "not available in this onnxruntime build"} for p in skipped]
    if skipped_info:
        from edgecli.runtimes.ort import available_providers

        avail = ", ".join(available_providers())
        for s in skipped_info:
            notes.append(f"provider {s['provider']} skipped: {s['reason']} (available: {avail})")
    fp = declare(cfg, targets)
    state: dict = {}

    def build(w: StageWriter):
        env = environment()
        rows, measurements, mnotes = measure(cfg, targets, providers, quiet)
        if not rows:
            raise CheckFailed("bench: nothing could be measured (every batch size was skipped)")
        allnotes = notes + mnotes
        ref_acc = _reference_accuracy(store, measurements)
        budgets = check_budgets(cfg, rows, measurements, target, ref_acc)
        failures = [f"{x['budget']} broken by {x['model']} ({x['where']}): "
                    + (f"measured {fmt_budget_value(x['measured'], x['unit'])}" if x["measured"] is not None
                       else "not measured")
                    + f", limit {fmt_budget_value(x['limit'], x['unit'])}"
                    for x in budgets if not x["ok"]]
        regression = None
        if base_data is not None:
            maxreg = b.max_regression if b.max_regression is not None else DEFAULT_MAX_REGRESSION
            if b.max_regression is None:
                allnotes.append(f"bench.budgets.max_regression not set: --baseline uses {maxreg:.0%}")
            regression = compare_baseline(rows, base_data, target, maxreg)
            regression["baseline_file"] = str(baseline)
            if regression["checked_rows"] == 0:
                failures.append(f"--baseline: no row of '{target}' matches {baseline} (model, provider, batch, threads)")
            for c in regression["rows"]:
                if not c["ok"]:
                    failures.append(f"p95 regression of {c['model']} (batch {c['batch']}, {c['threads']} thread(s)): "
                                    f"{fmt_ms(c['p95_ms'])} ms vs {fmt_ms(c['baseline_p95_ms'])} ms in the baseline, "
                                    f"{c['change']:+.1%} > +{maxreg:.0%}")
        many = len({r["provider"] for r in rows}) > 1
        results = {
            "version": RESULTS_VERSION, "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "pipeline": cfg.name, "config": cfg.section("bench"), "environment": env,
            "budget_model": target, "reference_accuracy": ref_acc, "many_providers": many,
            "models": [{"label": t.label, "kind": t.kind, "stage": t.stage, "path": str(t.path),
                        "size_bytes": t.size_bytes} for t in targets],
            "measurements": measurements, "rows": rows, "skipped": skipped_info,
            "budgets": budgets, "regression": regression, "notes": allnotes, "failures": failures,
        }
        if bc.serve is not None:  # the server scenario: `edgecli serve` on loopback under Poisson load
            from edgecli.loadgen import server_scenario

            results["serve"] = server_scenario(cfg, quiet)
        write_json_atomic(w.path("results.json"), results)
        md = markdown(results)
        w.path("results.md").write_text(md, encoding="utf-8")
        ref_batch, ref_threads = min(bc.batch_sizes), bc.threads[0]
        points = [{"label": r["model"] + (f" ({r['provider']})" if many else ""), "kind": r["kind"],
                   "p50_ms": r["p50_ms"], "accuracy": r["accuracy"], "size_bytes": r["size_bytes"]}
                  for r in rows if r["batch"] == ref_batch and r["threads"] == ref_threads]
        plot_pareto(points, w.path("pareto.png"),
                    f"{cfg.name}: accuracy vs p50 latency (batch {ref_batch}, {ref_threads} thread"
                    f"{'s' if ref_threads != 1 else ''}; marker size = file size)")
        state.update(results=results, md=md)
        tr = [r for r in rows if r["model"] == target and r["batch"] == ref_batch and r["threads"] == ref_threads]
        head = {"budget_model": target, "budgets_ok": not failures}
        if tr:
            head.update(p50_ms=tr[0]["p50_ms"], p95_ms=tr[0]["p95_ms"], accuracy=tr[0]["accuracy"],
                        size_bytes=tr[0]["size_bytes"], throughput_sps=tr[0]["throughput_sps"])
        return cfg.section("bench"), head, {"environment": env}

    # always measure: a bench result is an observation, never "up to date"
    res = run_stage(store, STAGE, fp, True, build, command="edgecli bench")
    results = state["results"]
    many = results["many_providers"]
    res.tables.append(Table(
        f"bench: {cfg.name} — {env_line(results['environment'])}",
        table_columns(many), [table_cells(r, many) for r in results["rows"]]))
    if results.get("serve"):
        from edgecli.loadgen import scenario_table

        res.tables.append(Table(f"bench.serve: {results['serve']['url']}, Poisson arrivals", *scenario_table(results["serve"])))
    if results["budgets"]:
        res.tables.append(Table(f"budgets ({target})", ["budget", "where", "measured", "limit", "result"],
                                [[x["budget"], x["where"], fmt_budget_value(x["measured"], x["unit"]),
                                  fmt_budget_value(x["limit"], x["unit"]), "ok" if x["ok"] else "BROKEN"]
                                 for x in results["budgets"]]))
    if results["regression"]:
        res.tables.append(Table(f"p95 vs baseline (max +{results['regression']['max_regression']:.0%})",
                                ["model", "batch", "threads", "baseline p95 ms", "p95 ms", "change", "result"],
                                [[c["model"], str(c["batch"]), str(c["threads"]), fmt_ms(c["baseline_p95_ms"]),
                                  fmt_ms(c["p95_ms"]), f"{c['change']:+.1%}", regression_verdict(c)]
                                 for c in results["regression"]["rows"]]))
    res.messages = results["notes"] + res.messages
    res.details = {k: v for k, v in results.items() if k != "rows"}
    res.details["rows"] = [{k: v for k, v in r.items() if k != "latencies_ns"} for r in results["rows"]]
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(state["md"] + "\n")
        except OSError as e:
            res.messages.append(f"could not append to $GITHUB_STEP_SUMMARY ({e.strerror})")
    if results["failures"]:
        res.exit_code = 1
        n = len(results["failures"])
        res.failure = (f"{n} budget checks failed: " if n > 1 else "") + "; ".join(results["failures"])
    return res
