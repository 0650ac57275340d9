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
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAVY if not _plain() else box.ASCII, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
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
