"""Error types and the one table that maps them to a line and an exit code.

Exit codes (documented in README.md):
    0  success
    1  a check failed: ONNX parity, a bench budget, a regression, an input that could not be answered
    2  bad usage: config, command-line, data or model file the user must fix
    (an unexpected internal error is also one line, exit 1; EDGECLI_DEBUG=1 shows its traceback)
    130 interrupted (Ctrl-C)
    143 terminated (SIGTERM)
"""

from __future__ import annotations

import os
import sys

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it


class EdgeError(Exception):
    """A failure the user can act on. Printed as one line, never as a traceback."""

    exit_code = EXIT_USAGE
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        out = [f"{self.kind}: {self.message}"]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


class ConfigError(EdgeError):
    """One or more problems in the pipeline config; each problem is one line."""

    kind = "config error"

    def __init__(self, problems: list[str] | str, *, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems), hint=hint)

    def lines(self) -> list[str]:
        out = [f"{self.kind}: {p}" for p in self.problems]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


class UsageError(EdgeError):
    kind = "usage error"


class DataError(EdgeError):
    kind = "data error"


class ModelFileError(EdgeError):
    """A model or weights file that cannot be loaded safely (truncated, not ONNX, unsafe)."""

    kind = "model error"


class ArtifactError(EdgeError):
    """A stage's input is missing or does not verify."""

    kind = "artifact error"


class LockError(EdgeError):
    kind = "locked"


class CheckFailed(EdgeError):
    """A measured check did not hold (parity, budget, regression)."""

    exit_code = EXIT_CHECK_FAILED
    kind = "check failed"


class NotImplementedStage(EdgeError):
    kind = "not implemented yet"


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI cancel, kill): unwinds like Ctrl-C so temp dirs and locks are cleaned."""


def debug_enabled() -> bool:
    return os.environ.get("EDGECLI_DEBUG", "") not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    # a path or value holding a newline must not forge a second "error:" line
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def report(exc: BaseException) -> int:
    """Print a known error as one line (plus an optional hint) on stderr; return its exit code."""
    if isinstance(exc, EdgeError):
        for line in exc.lines():
            print(_one_line(line), file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, Terminated):
        print("terminated: stopped by SIGTERM; nothing half-written was published", file=sys.stderr)
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted: stopped by Ctrl-C; nothing half-written was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        print("error: out of memory; try a smaller batch_size", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if type(exc).__module__.startswith("onnxruntime"):
        # a model that loads but cannot run (bad shapes, inconsistent graph) is the user's input to fix
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"{ModelFileError.kind}: ONNX Runtime cannot run this model ({type(exc).__name__}: {first})", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(_one_line(f"error: {exc.strerror or exc}{where}"), file=sys.stderr)
        return EXIT_CHECK_FAILED
    return -1  # unknown: see report_unexpected


def report_unexpected(exc: BaseException) -> int:
    """The funnel's last case: an exception no table row knows is still one line (exit 1), not a traceback."""
    if isinstance(exc, RecursionError):
        print("error: input nested too deeply (RecursionError); refused", file=sys.stderr)
        return EXIT_USAGE
    first = (str(exc).splitlines() or [""])[0][:200]
    print(_one_line(f"error: unexpected {type(exc).__name__}{': ' + first if first else ''}"), file=sys.stderr)
    if not debug_enabled():
        print("hint: this is a bug in edgecli; EDGECLI_DEBUG=1 shows the traceback", file=sys.stderr)
    return EXIT_CHECK_FAILED
