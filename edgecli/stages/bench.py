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
from edgecli.budgets import (
    DEFAULT_MAX_REGRESSION,
    budget_target,
    check_budgets,
    compare_baseline,
    load_baseline,
    regression_failures,
)
from edgecli.budgets import failures as budget_failures
from edgecli.config import PipelineConfig
from edgecli.errors import ArtifactError, CheckFailed, ConfigError, ModelFileError, UsageError
from edgecli.report import bench_tables, markdown, plot_pareto
from edgecli.runtimes.env import environment
from edgecli.runtimes.worker import WorkerResult, WorkerSpec, latency_stats, merge_repeats
from edgecli.runtimes.worker import run_worker as launch_worker
from edgecli.stages import Built, StageResult, Table, resolve_input, run_stage

STAGE = "bench"
MODEL_STAGES = ("train", "compress", "export")
TORCH_LABEL = "pytorch"
RESULTS_VERSION = 1


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


def run_worker(spec: WorkerSpec, tmp: Path, label: str) -> WorkerResult:
    """Measure in a fresh ``python -m edgecli.benchworker`` process; its result, or a one-line error."""
    idx = len(list(tmp.glob("spec*.json")))
    res = launch_worker(spec, tmp / f"spec{idx}.json", tmp / f"out{idx}.json", f"bench: the worker measuring {label}",
                        omp_threads=spec.threads if spec.kind == "torch" else None)
    if not res.ok:
        if os.environ.get("EDGECLI_DEBUG"):
            print(res.traceback or "", file=sys.stderr)
        if res.user_error:
            raise ModelFileError(f"bench: {label}: {res.error}")
        raise CheckFailed(f"bench: measuring {label} failed: {res.error}")
    return res


def _where_ran(t: Target, prov: str) -> str:
    """The provider column: the ORT provider, or the runtime and precision of a runtime target."""
    return f"{t.runtime['runtime']} {t.runtime['precision']}" if t.runtime else short_provider(prov)


def short_provider(p: str) -> str:
    return p[: -len("ExecutionProvider")] if p.endswith("ExecutionProvider") else p


def _jobs(cfg: PipelineConfig, targets: list[Target], providers: list[str], xs: dict, y_path: str | None,
          num_classes: int, notes: list[str]) -> list[tuple[Target, str, int, WorkerSpec]]:
    """(target, provider, threads, spec) of every measurement, in table order."""
    bc = cfg.bench
    jobs = []
    for t in targets:
        for prov in (["CPUExecutionProvider"] if t.kind in ("torch", "runtime") else providers):
            for threads in bc.threads:
                if t.kind == "torch" and xs.get(t.label) is None:
                    notes.append("PyTorch baseline skipped: the test split is not a numeric array")
                    continue
                rt = t.runtime or {}
                spec = WorkerSpec(
                    kind=t.kind, model=str(t.path), weights=str(t.path), model_info=t.info, providers=[prov],
                    threads=threads, batch_sizes=list(bc.batch_sizes), warmup=bc.warmup, runs=bc.runs,
                    min_time_s=bc.min_time_s, x=xs.get(t.label), y=y_path, accuracy_samples=bc.accuracy_samples,
                    num_classes=(t.info or {}).get("num_classes") or num_classes, backend=rt.get("runtime"),
                    precision=rt.get("precision"), input_names=rt.get("input_names"), embedder=rt.get("embedder"))
                jobs.append((t, prov, threads, spec))
    return jobs


def _record(t: Target, prov: str, threads: int, res: WorkerResult, processes: int, notes: list[str]
            ) -> tuple[dict, list[dict]]:
    """(the measurement, its rows: one per timed batch size) of one merged worker result."""
    if t.kind == "onnx" and prov not in res.providers_used:
        notes.append(f"{t.label}: {short_provider(prov)} did not take the model; it ran on "
                     f"{', '.join(short_provider(p) for p in res.providers_used)}")
    if res.accuracy_note:
        notes.append(f"{t.label}: timed on synthetic inputs, accuracy not measured ({res.accuracy_note})")
    acc = (res.metrics or {}).get("accuracy")
    m = {
        "model": t.label, "kind": t.kind, "provider": _where_ran(t, prov), "threads": threads,
        "providers_used": res.providers_used, "processes": processes, "import_ms": res.import_ms,
        "load_ms": res.load_ms, "first_inference_ms": res.first_ms,
        "cold_start_ms": (res.load_ms + res.first_ms) if res.first_ms is not None else None,
        "peak_memory_mb": res.peak_rss_kb / 1024, "rss_before_load_mb": res.rss_before_load_kb / 1024,
        "peak_memory_with_accuracy_mb": res.peak_rss_with_accuracy_kb / 1024,
        "torch_imported": res.torch_imported, "synthetic_inputs": res.synthetic_inputs,
        "accuracy_note": res.accuracy_note, "metrics": res.metrics,
    }
    rows = []
    for b in res.batches:
        if b.skipped is not None:
            notes.append(f"{t.label}: batch {b.batch} skipped ({b.skipped})")
            continue
        rows.append({
            "model": t.label, "kind": t.kind, "stage": t.stage, "path": str(t.path),
            "provider": _where_ran(t, prov), "batch": b.batch, "threads": threads,
            "size_bytes": t.size_bytes, "accuracy": acc, **latency_stats(b.latencies_ns, b.batch),
            "p50_per_process_ms": b.p50_per_process_ms, "p95_per_process_ms": b.p95_per_process_ms,
            "peak_memory_mb": m["peak_memory_mb"], "cold_start_ms": m["cold_start_ms"],
            "latencies_ns": b.latencies_ns, **({"sequence": b.sequence} if b.sequence is not None else {}),
        })
        if b.sequence is not None and not any("sequence length" in n for n in notes):
            notes.append(f"text models timed on test sentences at batch size b, padded to the "
                         f"longest of those b (sequence length {b.sequence} at batch {b.batch})")
    return m, rows


def measure(cfg: PipelineConfig, targets: list[Target], providers: list[str], quiet: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(rows, measurements, notes): ``bench.repeats`` fresh workers per model x provider x thread count.

    The repeats run in interleaved order (every model once, then every model again...), so drift in
    machine load hits all models alike, and per-process effects (which core, memory placement:
    30-50% on sub-millisecond models here) average out instead of deciding a comparison.
    """
    from edgecli.report import info
    from edgecli.safeio import temp_dir

    bc = cfg.bench
    rows: list[dict] = []
    measurements: list[dict] = []
    with temp_dir("bench") as td:  # named by pid: the next run removes it should this one be SIGKILLed
        tmp = Path(td)
        xs, y_path, num_classes, notes = _write_inputs(cfg, targets, tmp)
        jobs = _jobs(cfg, targets, providers, xs, y_path, num_classes, notes)
        results: list[list[WorkerResult]] = [[] for _ in jobs]
        for rep in range(bc.repeats):
            for j, (t, prov, threads, spec) in enumerate(jobs):
                if not quiet:
                    of = f" [process {rep + 1}/{bc.repeats}]" if bc.repeats > 1 else ""
                    info(f"bench: {t.label} on {short_provider(prov)}, {threads} thread(s){of}")
                # only the first process scores accuracy: the others would repeat the same numbers
                results[j].append(run_worker(spec if rep == 0 else spec.model_copy(update={"y": None}), tmp, t.label))
        if bc.repeats > 1:
            notes.append(f"latencies pooled over {bc.repeats} fresh processes per model, run in interleaved order "
                         "(results.json keeps each process's p50 and p95)")
        for (t, prov, threads, _), runs in zip(jobs, results, strict=True):
            m, mrows = _record(t, prov, threads, merge_repeats(runs), len(runs), notes)
            measurements.append(m)
            rows += mrows
    base = {(r["batch"], r["threads"]): r["p50_ms"] for r in rows if r["kind"] == "torch"}
    for r in rows:
        ref = base.get((r["batch"], r["threads"]))
        r["speedup_vs_pytorch"] = ref / r["p50_ms"] if ref and r["p50_ms"] > 0 else None
    return rows, measurements, notes


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


def _check(cfg: PipelineConfig, baseline: Path | None) -> dict | None:
    """Every mistake that fails before minutes of measuring: the budget batch, the baseline file."""
    b = cfg.bench.budgets
    if b.batch_size is not None and b.batch_size not in cfg.bench.batch_sizes:
        raise ConfigError(f"bench.budgets.batch_size: {b.batch_size} is not one of bench.batch_sizes {cfg.bench.batch_sizes}")
    base_data = load_baseline(baseline) if baseline else None  # a bad file fails before minutes of measuring
    if base_data is not None and base_data.get("pipeline") not in (None, cfg.name):
        # rows match by stage name: another pipeline's numbers would compare silently and wrongly
        raise UsageError(f"--baseline {baseline}: results of pipeline '{base_data.get('pipeline')}', "
                         f"not '{cfg.name}'; compare runs of the same pipeline")
    return base_data


def _providers(cfg: PipelineConfig, notes: list[str]) -> tuple[list[str], list[dict]]:
    """(the providers to measure ONNX models on, the skipped ones with why); a note per skipped one."""
    from edgecli.runtimes.ort import available_providers, resolve_providers

    usable, skipped = resolve_providers(list(cfg.bench.providers))
    providers = [p for p in cfg.bench.providers if p in usable] or ["CPUExecutionProvider"]
    skipped_info = [{"provider": p, "reason": "not available in this onnxruntime build"} for p in skipped]
    if skipped_info:
        avail = ", ".join(available_providers())
        for s in skipped_info:
            notes.append(f"provider {s['provider']} skipped: {s['reason']} (available: {avail})")
    return providers, skipped_info


def _regression(cfg: PipelineConfig, rows: list[dict], base_data: dict | None, baseline: Path | None, target: str,
                notes: list[str], failures: list[str]) -> dict | None:
    """The comparison with --baseline (None without one); its failures and notes appended."""
    if base_data is None:
        return None
    b = cfg.bench.budgets
    maxreg = b.max_regression if b.max_regression is not None else DEFAULT_MAX_REGRESSION
    if b.max_regression is None:
        notes.append(f"bench.budgets.max_regression not set: --baseline uses {maxreg:.0%}")
    regression = compare_baseline(rows, base_data, target, maxreg)
    regression["baseline_file"] = str(baseline)
    failures += regression_failures(regression, target, baseline)
    return regression


def _results(cfg: PipelineConfig, store: ArtifactStore, targets: list[Target], target: str, providers: list[str],
             skipped_info: list[dict], notes: list[str], base_data: dict | None, baseline: Path | None,
             quiet: bool) -> dict:
    """Measure, check budgets and the baseline: the whole results.json."""
    env = environment()
    rows, measurements, mnotes = measure(cfg, targets, providers, quiet)
    if not rows:
        raise CheckFailed("bench: nothing could be measured (every batch size was skipped)")
    allnotes = notes + mnotes
    ref_acc = _reference_accuracy(store, measurements)
    budgets = check_budgets(cfg.bench.budgets, cfg.bench.batch_sizes, rows, measurements, target, ref_acc)
    fails = budget_failures(budgets)
    regression = _regression(cfg, rows, base_data, baseline, target, allnotes, fails)
    results = {
        "version": RESULTS_VERSION, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "pipeline": cfg.name, "config": cfg.section("bench"), "environment": env,
        "budget_model": target, "reference_accuracy": ref_acc, "many_providers": len({r["provider"] for r in rows}) > 1,
        "models": [{"label": t.label, "kind": t.kind, "stage": t.stage, "path": str(t.path),
                    "size_bytes": t.size_bytes} for t in targets],
        "measurements": measurements, "rows": rows, "skipped": skipped_info,
        "budgets": budgets, "regression": regression, "notes": allnotes, "failures": fails,
    }
    if cfg.bench.serve is not None:  # the server scenario: `edgecli serve` on loopback under Poisson load
        from edgecli.loadgen import server_scenario

        results["serve"] = server_scenario(cfg, quiet)
    return results


def _write(cfg: PipelineConfig, w: StageWriter, results: dict) -> None:
    """results.json, results.md and pareto.png into the stage directory."""
    bc = cfg.bench
    write_json_atomic(w.path("results.json"), results)
    w.path("results.md").write_text(markdown(results), encoding="utf-8")
    ref_batch, ref_threads = min(bc.batch_sizes), bc.threads[0]
    many = results["many_providers"]
    points = [{"label": r["model"] + (f" ({r['provider']})" if many else ""), "kind": r["kind"],
               "p50_ms": r["p50_ms"], "accuracy": r["accuracy"], "size_bytes": r["size_bytes"]}
              for r in results["rows"] if r["batch"] == ref_batch and r["threads"] == ref_threads]
    plot_pareto(points, w.path("pareto.png"),
                f"{cfg.name}: accuracy vs p50 latency (batch {ref_batch}, {ref_threads} thread"
                f"{'s' if ref_threads != 1 else ''}; marker size = file size)")


def _headline(cfg: PipelineConfig, results: dict) -> dict:
    """The manifest's metrics: the budget model's row at the smallest batch and first thread count."""
    target = results["budget_model"]
    ref_batch, ref_threads = min(cfg.bench.batch_sizes), cfg.bench.threads[0]
    tr = [r for r in results["rows"] if r["model"] == target and r["batch"] == ref_batch and r["threads"] == ref_threads]
    head = {"budget_model": target, "budgets_ok": not results["failures"]}
    if tr:
        head.update(p50_ms=tr[0]["p50_ms"], p95_ms=tr[0]["p95_ms"], accuracy=tr[0]["accuracy"],
                    size_bytes=tr[0]["size_bytes"], throughput_sps=tr[0]["throughput_sps"])
    return head


def render(res: StageResult, results: dict) -> StageResult:
    """Tables, notes and details from results.json; exit 1 on a broken budget (touches no file)."""
    from edgecli.loadgen import scenario_table

    serve = scenario_table(results["serve"]) if results.get("serve") else None
    res.tables += [Table(title, cols, rows) for title, cols, rows in bench_tables(results, serve)]
    res.messages = results["notes"] + res.messages
    res.details = {k: v for k, v in results.items() if k != "rows"}
    res.details["rows"] = [{k: v for k, v in r.items() if k != "latencies_ns"} for r in results["rows"]]
    if results["failures"]:
        res.exit_code = 1
        n = len(results["failures"])
        res.failure = (f"{n} budget checks failed: " if n > 1 else "") + "; ".join(results["failures"])
    return res


def _append_summary(res: StageResult) -> None:
    """results.md appended to $GITHUB_STEP_SUMMARY when set (a CI job's page)."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write((res.dir / "results.md").read_text(encoding="utf-8") + "\n")
        except OSError as e:
            res.messages.append(f"could not append to $GITHUB_STEP_SUMMARY ({e.strerror})")


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False,
        baseline: Path | None = None, **_) -> StageResult:
    """Measure every model side by side, write results.json/results.md/pareto.png, check budgets."""
    base_data = _check(cfg, baseline)
    targets, notes = select_targets(cfg, store)
    target = budget_target(cfg.bench.budgets.model, targets)
    if cfg.bench.budgets.max_accuracy_drop is not None and not store.exists("train") \
            and "train" not in [t.label for t in targets]:
        raise ArtifactError("bench.budgets.max_accuracy_drop: needs the train stage's accuracy to compare with",
                            hint="run `edgecli train -c <config>` first")
    providers, skipped_info = _providers(cfg, notes)

    def build(w: StageWriter) -> Built:
        results = _results(cfg, store, targets, target, providers, skipped_info, notes, base_data, baseline, quiet)
        _write(cfg, w, results)
        return Built(cfg.section("bench"), _headline(cfg, results), {"environment": results["environment"]}, results)

    # always measure (force): a bench result is an observation, never "up to date"
    res = run_stage(store, STAGE, declare(cfg, targets), build, render, force=True, command="edgecli bench")
    _append_summary(res)
    return res
