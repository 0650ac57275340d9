"""``export.targets: auto``: every runtime x precision here, checked, timed, the fastest that holds published.

Candidates: the export's own ONNX Runtime model (always eligible: compress already held it to its
budget; it is what a failed search keeps) and, when that model is quantized, the float ONNX model it
came from (``onnx:fp32``, published as ``model-fp32.onnx`` if it wins), so the choice is never slower
than ONNX Runtime FP32; then every available backend's precisions for this CPU (``candidates()``:
OpenVINO's fp32, int8-weights and int8 everywhere, plus their bf16 variants where the CPU computes
bf16). Each is built and gated against the float reference (edgecli/runtimes/targets.py) before any
timing; a candidate that misses the accuracy drop or the cosine guard is reported and never timed.
A runtime that is not installed is skipped with its one-line reason in the table's notes.

Timing is bench's protocol: batch 1, one thread, ``bench.warmup`` + ``bench.runs`` calls per fresh
worker process (edgecli.benchworker, the same timer), ``bench.repeats`` processes per candidate run
in interleaved order, latencies pooled; the fastest pooled p50 wins. ONNX Runtime is kept when no
other candidate is faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecli.errors import CheckFailed, ConfigError, ModelFileError


def candidates(src) -> list[tuple[str, str]]:
    """(target, precision) pairs worth building here, and nothing whose runtime is missing."""
    from edgecli import runtimes
    from edgecli.runtimes.targets import BACKEND_TARGET

    out = []
    for backend_name, target in BACKEND_TARGET.items():
        b = runtimes.get(backend_name)
        if b.unavailable() or (b.source == "torch" and src.torch_ok):
            continue
        out += [(target, p) for p in b.candidates()]
    return out


def skipped(src) -> list[str]:
    from edgecli import runtimes
    from edgecli.runtimes.targets import BACKEND_TARGET

    notes = []
    for backend_name in BACKEND_TARGET:
        b = runtimes.get(backend_name)
        why = b.unavailable() or (src.torch_ok if b.source == "torch" else None)
        if why:
            notes.append(f"{backend_name} not tried: {why}")
    return notes


def runtime_spec(backend: str, path: Path, precision: str) -> dict:
    return {"kind": "runtime", "backend": backend, "model": str(path), "precision": precision}


def time_all(cfg, jobs: list[tuple[str, dict]], feeds: dict, tmp: Path, embed: bool, log
             ) -> tuple[list[list[int]], list[str | None]]:
    """Pooled batch-1, 1-thread latencies (ns) of each (label, worker spec), in interleaved order, and the
    precision each worker reported it really computed in (OpenVINO's compiled inference precision).

    A spec is edgecli.benchworker's: ``runtime_spec(...)`` for a runtime-layer file, or a PyTorch
    eager baseline (``kind: torch`` with weights and model_info); the timing fields are added here.
    """
    from edgecli.runtimes.worker import spawn, write_inputs

    bc = cfg.bench
    x = write_inputs({k: v[:8] for k, v in feeds.items()}, tmp, "timing")
    pooled: list[list[int]] = [[] for _ in jobs]
    ran: list[str | None] = [None for _ in jobs]
    for rep in range(bc.repeats):
        for j, (label, spec) in enumerate(jobs):
            log(f"timing {label} [process {rep + 1}/{bc.repeats}]")
            spec = {**spec, "input_names": list(feeds), "threads": 1, "batch_sizes": [1], "warmup": bc.warmup,
                    "runs": bc.runs, "min_time_s": bc.min_time_s, "x": x, "y": None, "embedder": embed}
            res = spawn(spec, tmp, label)
            pooled[j] += res["batches"][0]["latencies_ns"]
            ran[j] = res.get("ran_precision") or res.get("precision")
    return pooled, ran


def _ort_rows(cfg, src, onnx_final: Path) -> list[dict]:
    """The ONNX Runtime candidates: the export's own model (what a search that finds nothing faster keeps)
    and, when that model is quantized, the float model it came from, so that whatever is chosen is
    never slower than ONNX Runtime FP32."""
    from edgecli.runtimes.targets import gate, run_file

    prec = _ort_precision(onnx_final)
    par = gate(src, run_file(onnx_final, "onnxruntime", prec, src.feeds), prec, cfg.export.parity)
    rows = [{"candidate": f"onnx:{prec}", "target": "onnx", "precision": prec, "runtime": "onnxruntime",
             "model": onnx_final, "bytes": onnx_final.stat().st_size, "parity": par, "eligible": True,
             "why": None}]
    if prec != "fp32":
        fpar = gate(src, run_file(src.onnx, "onnxruntime", "fp32", src.feeds), "fp32", cfg.export.parity)
        rows.append({"candidate": "onnx:fp32", "target": "onnx", "precision": "fp32", "runtime": "onnxruntime",
                     "model": src.onnx, "bytes": src.onnx.stat().st_size, "parity": fpar, "eligible": fpar["passed"],
                     "why": None if fpar["passed"] else f"fails the gate: {fpar['why']}",
                     "files": [src.onnx]})
    return rows


def _build_rows(cfg, src, cdir: Path, log) -> list[dict]:
    """Every other runtime x precision available here, built and gated (never timed when it fails)."""
    from edgecli.runtimes.targets import build_checked

    rows = []
    for target, precision in candidates(src):
        label = f"{target}:{precision}"
        log(f"auto: building {label}")
        try:
            files, par, ran = build_checked(cfg, target, precision, src, cdir)
        except (CheckFailed, ModelFileError, ConfigError) as e:
            rows.append({"candidate": label, "target": target, "precision": precision, "eligible": False,
                         "why": f"not built: {e.message}"})
            continue
        ok = par["passed"]
        rows.append({"candidate": label, "target": target, "precision": precision, "runtime": _runtime(target),
                     "model": files[0], "files": files, "ran_precision": ran,
                     "bytes": sum(p.stat().st_size for p in files), "parity": par,
                     "eligible": ok, "why": None if ok else f"fails the gate: {par['why']}"})
    return rows


def choose(cfg, src, work: Path, onnx_final: Path, log, references: list[tuple[str, dict]] | None = None
           ) -> tuple[tuple | None, dict]:
    """(winner or None when the export's ONNX Runtime model stays, the choice table for the card and the
    stage's output).

    ``references`` (label, worker spec) are timed in the same interleaved rounds but never chosen
    (benchmarks/runtimes.py adds the PyTorch eager baseline this way). Ratios read against ONNX
    Runtime FP32: the export's model when it is float, else the float model it came from, which is
    then a candidate too, so the choice is never slower than ONNX Runtime FP32.
    """
    cdir = work / "auto"
    cdir.mkdir(exist_ok=True)
    rows = _ort_rows(cfg, src, onnx_final) + _build_rows(cfg, src, cdir, log)
    timed = [r for r in rows if r["eligible"]]
    jobs = [(r["candidate"], runtime_spec(r["runtime"], r["model"], r["precision"])) for r in timed]
    refs = [{"candidate": label, "reference": True, "eligible": False, "why": "reference (not a candidate)",
             **({"bytes": Path(spec["model"]).stat().st_size} if spec.get("kind") == "runtime" else {})}
            for label, spec in references or []]
    lat, ran = time_all(cfg, jobs + list(references or []), src.feeds, cdir, src.embed, log)
    for r, ns, rp in zip(timed + refs, lat, ran, strict=True):
        r["p50_ms"] = float(np.percentile(np.asarray(ns, dtype=np.float64), 50)) / 1e6
        r["runs"] = len(ns)
        if r.get("target") == "openvino":
            r["ran_precision"] = rp  # what the timed process compiled: f32 or bf16
    rows += refs
    base = next((r for r in rows if r["candidate"] == "onnx:fp32" and "p50_ms" in r), rows[0])
    for r in rows:
        if "p50_ms" in r:
            r["vs_onnxruntime"] = r["p50_ms"] / base["p50_ms"] if base["p50_ms"] else None
    best = min(timed, key=lambda r: r["p50_ms"])
    for r in timed:
        r["why"] = ("chosen: fastest that holds the gate" if r is best
                    else f"slower than {best['candidate']}")
        if r is rows[0]:
            r["why"] = f"the export's model, kept when nothing is faster; {r['why']}"
    table = {"rows": [{k: v for k, v in r.items() if k not in ("model", "files")} for r in rows],
             "chosen": best["candidate"], "baseline": base["candidate"],
             "protocol":
             f"batch 1, 1 thread, {cfg.bench.repeats} fresh processes x {cfg.bench.runs} runs, interleaved, pooled p50",
             "notes": skipped(src)}
    if best is rows[0]:
        return None, table
    return (best["target"], best["precision"], best["files"], best["parity"], best.get("ran_precision")), table


def _runtime(target: str) -> str:
    from edgecli.runtimes.targets import TARGETS

    return TARGETS[target][0]


def _ort_precision(path: Path) -> str:
    """"int8" for an integer-quantized model (QDQ, integer ops, weight-only INT8/INT4), "fp16" for FP16
    weights, else "fp32"."""
    from edgecli.onnxio import QUANT_OPS, is_quantized, load_onnx

    m = load_onnx(path, load_external=False)
    if any(n.op_type in QUANT_OPS for n in m.graph.node):
        return "int8"
    return "fp16" if is_quantized(m) else "fp32"  # no quantized op: reduced precision means FP16 weights


def publish(cfg, store, w, work: Path, stage: str | None, src_path: Path, info: dict | None, quantized: bool,
            feeds: dict, labels, onnx_final: Path, files: dict, log, parity: dict | None = None
            ) -> tuple[list[dict], dict | None]:
    """Build, check and publish the configured targets into the export bundle ``w``.

    Returns the card's ``targets`` list (model.onnx and model.ort first) and, for ``auto``, the choice
    table. A target that fails its gate stops the export (CheckFailed, nothing published), except
    under ``auto``, where it only loses the choice.
    """
    import shutil

    from edgecli.runtimes.targets import build_checked, entry, onnx_entries, parse, source

    want = cfg.export.targets
    own = onnx_entries(files, quantized, parity, _ort_precision(onnx_final) if quantized else None)
    if want == "auto" or want == ["auto"]:
        src = source(cfg, store, stage, src_path, info, quantized, feeds, labels)
        # a quantized input: its float model is timed beside the candidates, so ratios read against ORT FP32
        winner, table = choose(cfg, src, work, onnx_final, log)
        if winner is None:
            return own, table
        target, precision, built, par, ran = winner
        # the float ONNX model beside the export's own model.onnx, never over it
        names = [p.name for p in built] if target != "onnx" else [f"model-{precision}.onnx"]
        for p, name in zip(built, names, strict=True):
            shutil.copyfile(p, w.path(name))
        return own + [entry(target, precision, [w.path(n) for n in names], par, ran)], table
    extra = [parse(t) for t in want if parse(t)[0] not in ("onnx", "ort")]
    if not extra:
        return own, None
    src = source(cfg, store, stage, src_path, info, quantized, feeds, labels)
    out = own
    for target, precision in extra:
        log(f"building {target} ({precision})")
        built, par, ran = build_checked(cfg, target, precision, src, work)
        if not par["passed"]:
            raise CheckFailed(f"export parity ({target} {precision}, {par['samples']} samples): {par['why']}; "
                              "nothing was published")
        for p in built:
            shutil.copyfile(p, w.path(p.name))
        out.append(entry(target, precision, [w.path(p.name) for p in built], par, ran))
    return out, None
