"""bench's budgets and its comparison with a baseline results.json: pure functions of measured rows.

``check_budgets`` turns the measured rows of the budget model into one entry per budget and
configuration (measured, limit, ok); ``compare_baseline`` matches rows with an earlier run by
(model, provider, batch, threads); ``failures`` and ``regression_failures`` word the broken ones as
the one-line reasons the stage reports (exit 1). ``load_baseline`` is the only function that reads
a file: a malformed baseline fails before minutes of measuring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgecli.errors import ConfigError, UsageError

DEFAULT_MAX_REGRESSION = 0.10


def budget_target(want: str | None, targets: list) -> str:
    """The label of the model budgets apply to (``bench.budgets.model``; default the last ONNX model).

    ``targets`` are bench's targets (``label``, ``kind``, ``path``); ``want`` may be a label, a path
    or a file name."""
    from edgecli.registry import did_you_mean

    labels = [t.label for t in targets]
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


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _where(r: dict, many_providers: bool) -> str:
    s = f"batch {r['batch']}, {_threads(r['threads'])}"
    return f"{r['provider']}, {s}" if many_providers else s


def check_budgets(budgets, batch_sizes: list[int], rows: list[dict], measurements: list[dict], target: str,
                  reference_accuracy: float | None) -> list[dict]:
    """One entry per budget and measured configuration: measured value, limit, ok.

    ``budgets`` is ``cfg.bench.budgets``; latency budgets apply at ``budgets.batch_size`` (default the
    smallest of ``batch_sizes``), accuracy budgets to the worst process of the target."""
    b = budgets
    many = len({r["provider"] for r in rows}) > 1
    mine = [r for r in rows if r["model"] == target]
    bs = b.batch_size or min(batch_sizes)
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
                f"{m['provider']}, {_threads(m['threads'])}" if many else _threads(m["threads"]))
    return out


def failures(budgets: list[dict]) -> list[str]:
    """One line per broken budget: who broke it where, measured against the limit."""
    from edgecli.report import fmt_budget_value

    return [f"{x['budget']} broken by {x['model']} ({x['where']}): "
            + (f"measured {fmt_budget_value(x['measured'], x['unit'])}" if x["measured"] is not None
               else "not measured")
            + f", limit {fmt_budget_value(x['limit'], x['unit'])}"
            for x in budgets if not x["ok"]]


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
        bad = _bad_row(r)
        if bad:
            raise UsageError(f"--baseline {shown(path)}: rows[{i}] {bad}; not an edgecli bench results.json")
    if data.get("pipeline") is not None and not isinstance(data["pipeline"], str):
        raise UsageError(f"--baseline {shown(path)}: 'pipeline' is not a string")
    return data


def _bad_row(r) -> str | None:
    """Why one baseline row cannot be compared with, or None."""
    if not isinstance(r, dict):
        return "is not an object"
    if not isinstance(r.get("model"), str):
        return "has no model name"
    p95 = r.get("p95_ms")
    if p95 is not None and (isinstance(p95, bool) or not isinstance(p95, (int, float))
                            or not math.isfinite(p95) or p95 <= 0):
        return "has a p95_ms that is not a positive number"
    if not all(isinstance(r.get(k), (str, int, type(None))) and not isinstance(r.get(k), bool)
               for k in ("provider", "batch", "threads")):
        return "has a provider, batch or threads of the wrong type"
    return None


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


def regression_failures(regression: dict, target: str, baseline_file) -> list[str]:
    """One line per regressed row of ``compare_baseline``'s result; one when no row of the target matched."""
    from edgecli.report import fmt_ms

    out = []
    if regression["checked_rows"] == 0:
        out.append(f"--baseline: no row of '{target}' matches {baseline_file} (model, provider, batch, threads)")
    maxreg = regression["max_regression"]
    for c in regression["rows"]:
        if not c["ok"]:
            out.append(f"p95 regression of {c['model']} (batch {c['batch']}, {c['threads']} thread(s)): "
                       f"{fmt_ms(c['p95_ms'])} ms vs {fmt_ms(c['baseline_p95_ms'])} ms in the baseline, "
                       f"{c['change']:+.1%} > +{maxreg:.0%}")
    return out
