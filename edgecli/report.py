"""Output: status lines on stderr, result tables and JSON on stdout (rich)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

_QUIET = False


def set_quiet(q: bool) -> None:
    global _QUIET
    _QUIET = q


def is_quiet() -> bool:
    return _QUIET


def _plain() -> bool:
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, no_color=_plain(), soft_wrap=True)


def out_console():
    from rich.console import Console

    return Console(highlight=False, no_color=_plain(), soft_wrap=False,
                   width=None if sys.stdout.isatty() else 200)


def info(msg: str) -> None:
    """A progress/status line on stderr (hidden by -q)."""
    if not _QUIET:
        err_console().print(msg, markup=False)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def render_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """One result table on stdout."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    # cells are text, never rich markup: "pip install -e '.[openvino]'" keeps its brackets
    t = Table(title=escape(title), box=box.SIMPLE_HEAVY if not _plain() else box.ASCII, title_justify="left")
    for i, c in enumerate(columns):
        # the last column (a verdict, a reason) wraps when the table is too wide, so the numbers before it
        # are never cut to an ellipsis
        last = i == len(columns) - 1 and i > 0
        t.add_column(escape(c), justify="left" if i == 0 else "right", no_wrap=not last,
                     overflow="fold" if last else "ellipsis")
    for r in rows:
        t.add_row(*[escape(fmt(v)) for v in r])
    out_console().print(t)


def print_json(obj: Any) -> None:
    """Strict JSON on stdout: a non-finite float (no JSON value) is written as null, never as NaN."""
    from edgecli.artifacts import _json_default

    sys.stdout.write(json.dumps(_finite_only(obj), default=_json_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite_only(obj: Any) -> Any:
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    try:
        import numpy as np

        if isinstance(obj, np.floating):
            return float(obj) if np.isfinite(obj) else None
        if isinstance(obj, np.ndarray):
            return _finite_only(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return obj


# --------------------------------------------------------------------------- bench: cells (the table and results.md share them)


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


def regression_verdict(c: dict) -> str:
    if not c["checked"]:
        return "not checked"
    if c["within_noise"]:
        lo, hi = c["p95_process_range_ms"]
        return f"ok (noise: processes {fmt_ms(lo)}-{fmt_ms(hi)})"
    return "ok" if c["ok"] else "REGRESSED"


def env_line(env: dict) -> str:
    isa = env["isa"]
    flags = ", ".join(f"{k.upper().replace('AVX512', 'AVX-512')} {'yes' if v else 'no'}" for k, v in isa.items())
    v = env["versions"]
    vers = " · ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "torch", "onnx", "ai-edge-litert",
                                              "executorch", "openvino") if k in v)
    return f"{env['cpu_model']} ({env['usable_cpus']} usable CPUs; {flags}) · {vers}"


def bench_tables(results: dict, serve_table: tuple[list[str], list[list]] | None = None
                 ) -> list[tuple[str, list[str], list[list]]]:
    """(title, columns, rows) of bench's terminal tables: the results, the server scenario (``serve_table``,
    loadgen's columns and rows), budgets, baseline."""
    many = results["many_providers"]
    out = [(f"bench: {results['pipeline']} — {env_line(results['environment'])}",
            table_columns(many), [table_cells(r, many) for r in results["rows"]])]
    if results.get("serve") and serve_table:
        out.append((f"bench.serve: {results['serve']['url']}, Poisson arrivals", *serve_table))
    if results["budgets"]:
        out.append((f"budgets ({results['budget_model']})", ["budget", "where", "measured", "limit", "result"],
                    [[x["budget"], x["where"], fmt_budget_value(x["measured"], x["unit"]),
                      fmt_budget_value(x["limit"], x["unit"]), "ok" if x["ok"] else "BROKEN"]
                     for x in results["budgets"]]))
    reg = results["regression"]
    if reg:
        out.append((f"p95 vs baseline (max +{reg['max_regression']:.0%})",
                    ["model", "batch", "threads", "baseline p95 ms", "p95 ms", "change", "result"],
                    [[c["model"], str(c["batch"]), str(c["threads"]), fmt_ms(c["baseline_p95_ms"]),
                      fmt_ms(c["p95_ms"]), f"{c['change']:+.1%}", regression_verdict(c)] for c in reg["rows"]]))
    return out


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
    if results.get("profiles"):  # bench --profile
        lines += _profile_markdown(results["profiles"])
    if results["notes"]:
        lines += [""] + [f"- {n}" for n in results["notes"]]
    if results["failures"]:
        lines += ["", "**Failed:** " + "; ".join(results["failures"])]
    return "\n".join(lines) + "\n"


def _profile_markdown(profiles: list[dict]) -> list[str]:
    """results.md's "where the time goes": the top operators of each profiled model (bench --profile)."""
    from edgecli.runtimes.profile import tables

    ptables, plines = tables(profiles, top=5)
    lines: list[str] = []
    for title, cols, rows in ptables:
        lines += ["", f"### {title}", "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + ([""] + [f"- {x}" for x in plines] if plines else [])


# --------------------------------------------------------------------------- bench: the Pareto plot


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of points no other point beats on both latency (lower) and accuracy (higher)."""
    idx = sorted(range(len(points)), key=lambda i: (points[i]["p50_ms"], -points[i]["accuracy"]))
    front, best = [], -1.0
    for i in idx:
        if points[i]["accuracy"] > best:
            front.append(i)
            best = points[i]["accuracy"]
    return front


def plot_pareto(points: list[dict], path, title: str):
    """Accuracy vs p50 latency, marker area by file size, Pareto front highlighted, points labelled.

    Labels never overlap: models that compress to the same latency and accuracy (a quantized copy
    that did not change, the same model on two providers) would otherwise print on top of each
    other; each label after the first that would is moved up or down until it is clear
    (``_separate_labels``). Returns the figure (its texts are the labels, as drawn)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = [p for p in points if p.get("accuracy") is not None]
    labels = []
    if pts:
        sizes = np.array([p["size_bytes"] for p in pts], dtype=float)
        area = 60 + 900 * np.sqrt(sizes / sizes.max())
        front = set(pareto_front(pts))
        for i, p in enumerate(pts):
            on = i in front
            face = to_rgba("tab:orange" if p["kind"] == "torch" else "tab:blue", 0.55)
            ax.scatter([p["p50_ms"]], [p["accuracy"]], s=area[i], facecolors=[face],
                       edgecolors="crimson" if on else "black", linewidths=2.2 if on else 0.6, zorder=3)
            labels.append(ax.annotate(f"{p['label']}\n{fmt_ms(p['p50_ms'])} ms, {fmt_size(p['size_bytes'])}",
                                      (p["p50_ms"], p["accuracy"]), textcoords="offset points", xytext=(8, 8),
                                      fontsize=8))
        _front_line(ax, sorted((pts[i] for i in front), key=lambda p: p["p50_ms"]))
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
    _separate_labels(fig, labels)
    fig.savefig(str(path))
    return fig


def _front_line(ax, fr: list[dict]) -> None:
    """The Pareto front as a staircase (a legend entry alone when it is one point)."""
    if len(fr) > 1:
        xs_, ys_ = [fr[0]["p50_ms"]], [fr[0]["accuracy"]]
        for p in fr[1:]:
            xs_ += [p["p50_ms"], p["p50_ms"]]
            ys_ += [ys_[-1], p["accuracy"]]
        ax.plot(xs_, ys_, color="crimson", linewidth=1.2, linestyle="--", zorder=2, label="Pareto front (red outline)")
    else:
        ax.plot([], [], color="crimson", linestyle="--", label="Pareto front (red outline)")


def _separate_labels(fig, labels: list, gap_pt: float = 2.0) -> None:
    """Move each label whose drawn box overlaps an earlier one up, then down, by whole label heights.

    Works on the extents matplotlib computes for the final layout, so it holds for any axis scale."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for ann in labels:
        x0, y0 = ann.xyann
        box = ann.get_window_extent(renderer)
        step = box.height * 72.0 / fig.dpi + gap_pt  # one label height, in points
        for k in range(2 * len(labels) + 1):
            dy = 0 if k == 0 else (k + 1) // 2 * step * (1 if k % 2 else -1)
            ann.xyann = (x0, y0 + dy)
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(o) for o in placed):
                break
        placed.append(box)
