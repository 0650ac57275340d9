"""The runtime layer: the one place that opens inference sessions.

Each backend is one module exposing ``BACKEND`` (see :class:`Backend`), listed in ``BACKENDS``
as name -> "module:attr" and imported on use, like the model and dataset registries, so that
``edgecli --help`` imports no runtime. Stages, compress scoring, export parity, the bench worker,
infer and serve all open models through :func:`get` / :func:`open_session`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgecli.errors import ConfigError

# name -> "module:attr"; a new runtime is one module and one row here
BACKENDS: dict[str, str] = {
    "onnxruntime": "edgecli.runtimes.ort:BACKEND",
    "litert": "edgecli.runtimes.litert:BACKEND",
    "executorch": "edgecli.runtimes.executorch:BACKEND",
    "openvino": "edgecli.runtimes.openvino:BACKEND",
}

# file suffix -> backend name (infer picks the runtime by extension)
SUFFIXES: dict[str, str] = {
    ".onnx": "onnxruntime",
    ".ort": "onnxruntime",
    ".tflite": "litert",
    ".pte": "executorch",
    ".xml": "openvino",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or str/None for symbolic dims
    dtype: np.dtype


class Session(Protocol):
    backend: str  # BACKENDS key
    precision: str  # what really ran: "fp32", "int8", "bf16", ...
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    name: str  # BACKENDS key
    extra: str | None  # the pip extra that installs it ("litert"), None if always installed
    suffix: str  # file suffix it runs: ".onnx", ".tflite", ".pte", ".xml"

    def unavailable(self) -> str | None:
        """None when usable; else one line naming the cause and ``pip install -e '.[extra]'``."""

    def version(self) -> str: ...

    def open(self, path: str | Path, *, threads: int = 1, precision: str | None = None) -> Session: ...


def require(name: str) -> Any:
    """The backend called ``name``, usable: else a ConfigError (exit 2) naming the extra to install."""
    b = get(name)
    why = b.unavailable()
    if why:
        raise ConfigError(f"runtime {name}: {why}")
    return b


def install_errors(method):
    """For a backend's ``open`` and ``convert``: a runtime package that is installed but does not import
    (a broken wheel, a missing shared library) is a ConfigError naming the extra, as a missing one is."""
    import functools

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ImportError as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"runtime {self.name}: installed but does not import ({line}); "
                              f"reinstall it with: pip install -e '.[{self.extra}]'") from None

    return guarded


def missing_extra(name: str, extra: str, modules: tuple[str, ...]) -> str | None:
    """None when every module in ``modules`` can be found; else the one line a user needs."""
    import importlib.util

    for mod in modules:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{name} is not installed ({mod} missing); install it with: pip install -e '.[{extra}]'"
    return None


@dataclass(frozen=True)
class TorchConverted:
    """A backend whose files are converted from the PyTorch module (LiteRT, ExecuTorch).

    What differs between such backends is data and two functions, so one record serves each of them
    (no base class): ``convert_fn(module, example, out_path, precision, calib)`` gets the module in
    eval mode and a precision it supports; ``open_fn(path, threads, precision)`` returns a Session.
    """

    name: str  # BACKENDS key
    label: str  # the runtime's name in the install hint
    extra: str  # the pip extra that installs it
    suffix: str
    modules: tuple[str, ...]  # what must be importable for it to be usable
    dist: str  # the distribution whose version results record
    precisions: tuple[str, ...]
    convert_fn: Callable = field(repr=False)
    open_fn: Callable = field(repr=False)
    source: str = "torch"  # converts from the PyTorch module

    def unavailable(self) -> str | None:
        return missing_extra(self.label, self.extra, self.modules)

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.dist)

    def candidates(self) -> list[str]:
        return list(self.precisions)

    @install_errors
    def convert(self, module, example: tuple, out_path: Path, *, precision: str = "fp32",
                calib: list[tuple] | None = None) -> Path:
        """``out_path`` (the backend's suffix) from ``module`` traced on ``example`` (batch-1 tensors)."""
        if precision not in self.precisions:
            raise ConfigError(f"{self.name}: unknown precision '{precision}'; choose from {', '.join(self.precisions)}")
        return self.convert_fn(module.eval(), example, out_path, precision, calib)

    @install_errors
    def open(self, path, *, threads: int = 1, precision: str | None = None, **options) -> Session:
        """``options``: the backend's own switches (ExecuTorch: ``etdump``)."""
        return self.open_fn(path, threads, precision, **options)


def names() -> list[str]:
    return sorted(BACKENDS)


def get(name: str) -> Any:
    """The backend called ``name``; a ConfigError with 'did you mean' for an unknown name."""
    from edgecli.registry import import_target

    if name not in BACKENDS:
        from edgecli.registry import did_you_mean

        raise ConfigError(f"runtime: unknown runtime '{name}'{did_you_mean(name, BACKENDS)}; "
                          f"choose from {', '.join(names())}")
    return import_target(BACKENDS[name], "runtime")


def for_file(path: str | Path) -> str:
    """The backend name that runs ``path``, by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: no runtime runs '{suffix or 'no suffix'}' files; "
                          f"known: {', '.join(sorted(SUFFIXES))}")
    return SUFFIXES[suffix]


def by_position(inputs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` keyed by this file's own input names.

    Converters rename inputs (LiteRT: ``args_0``, ExecuTorch: positional only), while callers feed
    the card's ONNX names; names that match are used as they are, otherwise the feeds are taken in
    order, as the card lists them.
    """
    names = [i.name for i in inputs]
    if set(feeds) == set(names):
        return {n: np.ascontiguousarray(feeds[n], dtype=_np_dtype(i.dtype)) for n, i in zip(names, inputs, strict=True)}
    if len(feeds) != len(inputs):
        from edgecli.errors import DataError

        raise DataError(f"the model takes {len(inputs)} input(s) ({', '.join(names)}), got {len(feeds)}")
    return {i.name: np.ascontiguousarray(v, dtype=_np_dtype(i.dtype)) for i, v in zip(inputs, feeds.values(), strict=True)}


def _np_dtype(dt) -> np.dtype:
    return np.dtype(dt)


def rows_of(arrays: list[np.ndarray], inputs: list[TensorSpec]):
    """The feed in chunks of the file's fixed batch size (LiteRT and ExecuTorch files are exported at
    batch 1); the last chunk is padded by repeating its last row, and callers cut the answer back."""
    fixed = inputs[0].shape[0] if inputs and inputs[0].shape else None
    n = len(arrays[0]) if arrays and np.ndim(arrays[0]) else 1
    if not isinstance(fixed, int) or fixed <= 0 or fixed == n:
        yield arrays
        return
    for i in range(0, n, fixed):
        chunk = [a[i:i + fixed] for a in arrays]
        short = fixed - len(chunk[0])
        if short:
            chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
        yield [np.ascontiguousarray(c) for c in chunk]


@contextlib.contextmanager
def _fd_redirect(fd: int, target: int | None):
    """Point file descriptor ``fd`` at ``target`` (another fd; None: /dev/null) for the block, at the
    file-descriptor level, so that C++ code writing to it is redirected too; restored on the way out."""
    import os
    import sys

    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    if target is None:
        target = os.open(os.devnull, os.O_WRONLY)
        os.dup2(target, fd)
        os.close(target)
    else:
        os.dup2(target, fd)
    try:
        yield
    finally:
        stream.flush()
        os.dup2(saved, fd)
        os.close(saved)


def quiet_native_stderr():
    """Hold back what a runtime's C++ and import-time code write to stderr (fd 2) while it loads a model:
    ExecuTorch's cpuinfo and threadpool lines, torchao's "Failed to load ..._C_mxfp8...so", LiteRT's
    "INFO: Created TensorFlow Lite XNNPACK delegate". ``-v`` (EDGECLI_VERBOSE) shows them. Errors are not
    lost: the runtimes raise, and edgecli reports the exception as its one line."""
    import os

    return contextlib.nullcontext() if os.environ.get("EDGECLI_VERBOSE") else _fd_redirect(2, None)


def stdout_to_stderr():
    """Send what converters print (Python and C++ alike, at the file-descriptor level) to stderr.

    litert-torch prints its progress lines to stdout; stdout is for results (``--json``)."""
    return _fd_redirect(1, 2)
