"""The runtime layer: the one place that opens inference sessions.

Each backend is one module exposing ``BACKEND`` (see :class:`Backend`), listed in ``BACKENDS``
as name -> "module:attr" and imported on use, like the model and dataset registries, so that
``edgecli --help`` imports no runtime. Stages, compress scoring, export parity, the bench worker,
infer and serve all open models through :func:`get` / :func:`open_session`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgecli.errors import ConfigError

# name -> "module:attr"; a new runtime is one module and one row here
BACKENDS: dict[str, str] = {
    "onnxruntime": "edgecli.runtimes.ort:BACKEND",
}

# file suffix -> backend name (infer picks the runtime by extension)
SUFFIXES: dict[str, str] = {
    ".onnx": "onnxruntime",
    ".ort": "onnxruntime",
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


def names() -> list[str]:
    return sorted(BACKENDS)


def get(name: str) -> Any:
    """The backend called ``name``; a ConfigError with 'did you mean' for an unknown name."""
    from edgecli.registry import import_target

    if name not in BACKENDS:
        from edgecli.config import did_you_mean

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
