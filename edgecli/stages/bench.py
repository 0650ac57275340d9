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
``$GITHUB_STEP_SUMMARY`` when set) and pareto.png; with ``--profile`` (``bench.profile``) also one
``profile-<model>.*`` file per model from its runtime's own profiler (edgecli/runtimes/profile.py). Broken budgets are reported after the results
are published (so CI can upload them) and make the command exit 1.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

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
from edgecli.errors import ArtifactError, CheckFailed, ConfigError, UsageError
from edgecli.measure import Target, measure
from edgecli.report import bench_tables, markdown, plot_pareto
from edgecli.runtimes.env import environment
from edgecli.stages import Built, StageResult, Table, resolve_input, run_stage

STAGE = "bench"
MODEL_STAGES = ("train", "compress", "export")
TORCH_LABEL = "pytorch"
RESULTS_VERSION = 1


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

        store.require("export", "card.json")  # the card names the files: it and each of them as published
        entries, rnotes = bench_entries(store.stage_dir("export"), cfg.bench.runtimes)
        for e in entries:
            for fname in e["files"]:
                store.require("export", fname)
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
             quiet: bool, profile_dir: Path | None = None) -> dict:
    """Measure, check budgets and the baseline: the whole results.json (profiles too, with ``profile_dir``)."""
    env = environment()
    rows, measurements, mnotes, profiles = measure(cfg, targets, providers, quiet, profile_dir)
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
    if profile_dir is not None:  # bench --profile: where the time goes, per model (edgecli.runtimes.profile)
        results["profiles"] = profiles
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
    if results.get("profiles"):
        from edgecli.runtimes.profile import tables

        ptables, lines = tables(results["profiles"])
        res.tables += [Table(title, cols, rows) for title, cols, rows in ptables]
        res.messages += lines
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
        results = _results(cfg, store, targets, target, providers, skipped_info, notes, base_data, baseline, quiet,
                           w.dir if cfg.bench.profile else None)
        _write(cfg, w, results)
        return Built(cfg.section("bench"), _headline(cfg, results), {"environment": results["environment"]}, results)

    # always measure (force): a bench result is an observation, never "up to date"
    res = run_stage(store, STAGE, declare(cfg, targets), build, render, force=True, command="edgecli bench")
    _append_summary(res)
    return res
