"""Time compress's final choice with bench's protocol before it is published.

compress ranks candidates in one process (``quantize.time_p50``); ``edgecli bench`` measures each
model in fresh processes, interleaved, with the timed runs pooled. On a user's residual CNN the
two disagreed: compress chose static INT8 at "0.88x" while bench measured the published model at
1.0-1.1x its input (issue 12). So under ``objective: latency`` compress asks the bench worker
itself (``python -m edgecli.benchworker``, the very process bench runs) and publishes only what
that protocol confirms faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecli.errors import CheckFailed


def _worker(spec: dict, tmp: Path, n: int) -> dict:
    from edgecli.runtimes.worker import launch

    res = launch(spec, tmp / f"confirm-spec{n}.json", tmp / f"confirm-out{n}.json",
                 "compress: the bench worker confirming latency")
    if not res.get("ok"):
        raise CheckFailed(f"compress: the bench worker confirming latency failed: {res.get('error')}")
    return res


def bench_p50(paths: list[Path], feed1: dict[str, np.ndarray], threads: int, *, repeats: int = 3,
              warmup: int = 20, runs: int = 100, min_time_s: float = 0.15, tmp: Path) -> list[dict]:
    """Per model: pooled p50 (ms) over ``repeats`` fresh bench-worker processes run in interleaved
    order (A B A B ...), and each process's p50, at batch 1 on ``threads`` threads."""
    if len(feed1) == 1:
        xpath = tmp / "confirm-x.npy"
        np.save(xpath, next(iter(feed1.values())))
    else:
        xpath = tmp / "confirm-x.npz"
        np.savez(xpath, **feed1)
    pooled: list[list[int]] = [[] for _ in paths]
    per: list[list[float]] = [[] for _ in paths]
    n = 0
    for _ in range(max(1, repeats)):
        for i, p in enumerate(paths):
            spec = {"kind": "onnx", "model": str(p), "providers": ["CPUExecutionProvider"], "threads": threads,
                    "batch_sizes": [1], "warmup": warmup, "runs": runs, "min_time_s": min_time_s,
                    "x": str(xpath), "y": None}
            lat = _worker(spec, tmp, n)["batches"][0]["latencies_ns"]
            n += 1
            pooled[i] += lat
            per[i].append(float(np.percentile(lat, 50)) / 1e6)
    return [{"p50_ms": float(np.percentile(lat, 50)) / 1e6, "p50_per_process_ms": pp, "processes": len(pp)}
            for lat, pp in zip(pooled, per, strict=True)]


def confirm_choice(points: list[tuple[str, Path]], feed1: dict[str, np.ndarray], threads: int, *, repeats: int,
                   min_speedup: float, tmp: Path) -> dict:
    """Which of ``points`` (the input first, then each step's output, the last one compress's choice)
    to publish: the fastest by bench's protocol, if it beats the input by ``min_speedup``; else the input.

    Returns a JSON-ready record: every point's pooled p50 and per-process p50s, its ratio to the
    input, the index chosen and the reason."""
    seen: dict[Path, int] = {}
    uniq = [(n, p) for n, p in points if not (Path(p).resolve() in seen or seen.setdefault(Path(p).resolve(), 0))]
    times = bench_p50([p for _, p in uniq], feed1, threads, repeats=repeats, tmp=tmp)
    base = times[0]["p50_ms"]
    rows = [{"model": n, **t, "ratio_to_input": round(t["p50_ms"] / base, 4) if base > 0 else None}
            for (n, _), t in zip(uniq, times, strict=True)]
    best = min(range(len(rows)), key=lambda i: rows[i]["p50_ms"])
    if best != 0 and rows[best]["p50_ms"] >= base * (1 - min_speedup):
        best = 0
    last = len(rows) - 1
    if best == last:
        why = f"confirmed: {rows[last]['model']} at {rows[last]['ratio_to_input']:.2f}x its input"
    elif best == 0:
        why = (f"not confirmed: {rows[last]['model']} ran at {rows[last]['ratio_to_input']:.2f}x its input "
               f"(needs < {1 - min_speedup:.2f}x); the input is published")
    else:
        why = (f"not confirmed: {rows[last]['model']} ran at {rows[last]['ratio_to_input']:.2f}x its input; "
               f"{rows[best]['model']} ({rows[best]['ratio_to_input']:.2f}x) is published")
    return {"protocol": f"bench worker, {repeats} fresh processes per model, interleaved, timed runs pooled, "
                        f"batch 1, {threads} thread(s)",
            "models": rows, "chosen": rows[best]["model"], "chosen_index": [p for _, p in points].index(uniq[best][1]),
            "reason": why}
