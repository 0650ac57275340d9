"""Model feeds: the input spec of a model, whether a batch fits it, input files, synthetic inputs.

Shared by compress (scoring, calibration), export (parity samples), the bench worker (timing
inputs) and the model probe, so that each feeds a model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecli.errors import DataError


@dataclass
class InputSpec:
    name: str
    shape: list  # ints for fixed dims, None for symbolic ones
    dtype: type

    def describe(self) -> str:
        dims = ",".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.name}[{dims}] {np.dtype(self.dtype).name}"


def fit_problem(x: np.ndarray, spec: InputSpec) -> str | None:
    """Why the batch ``x`` cannot feed ``spec`` (None when it fits)."""
    if x.ndim != len(spec.shape):
        return f"has {x.ndim} dims {list(x.shape)}, the model input {spec.describe()} has {len(spec.shape)}"
    for i, (have, want) in enumerate(zip(x.shape, spec.shape, strict=False)):
        if i > 0 and want is not None and have != want:
            return f"has shape {list(x.shape)}, the model input is {spec.describe()} (dim {i}: {have} != {want})"
    if x.dtype != np.dtype(spec.dtype):
        return f"has dtype {x.dtype}, the model input {spec.name} expects {np.dtype(spec.dtype).name}"
    return None


def input_path(path, key: str) -> Path:
    """``path`` (``~`` expanded) when it is a regular file; else the DataError naming ``key``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{key}: {path} does not exist")
    if not path.is_file():  # a FIFO would block, /dev/zero never end
        raise DataError(f"{key}: {path} is not a regular file (a directory, FIFO or device); refused")
    return path


def load_input_file(path: Path, inputs: list[InputSpec], key: str) -> dict[str, np.ndarray]:
    """Model inputs from an .npy (single-input models) or .npz (one array per input name) file."""
    path = input_path(path, key)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = {None: np.load(path, allow_pickle=False)}
    except ValueError as e:
        raise DataError(f"{key}: {path} is not a plain numeric .npy/.npz ({e}); object arrays are refused") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{key}: cannot read {path} as .npy/.npz ({type(e).__name__})") from None
    feeds: dict[str, np.ndarray] = {}
    if None in arrays or len(arrays) == 1 and len(inputs) == 1 and inputs[0].name not in arrays:
        if len(inputs) != 1:
            raise DataError(f"{key}: the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                            "give an .npz with one array per input name")
        feeds[inputs[0].name] = next(iter(arrays.values()))
    else:
        missing = [i.name for i in inputs if i.name not in arrays]
        if missing:
            raise DataError(f"{key}: {path} has arrays {sorted(arrays)}; missing model input(s) {missing}")
        feeds = {i.name: arrays[i.name] for i in inputs}
    n = None
    for spec in inputs:
        x = feeds[spec.name]
        if x.ndim == len(spec.shape) - 1:  # one sample given without the batch axis
            x = feeds[spec.name] = x[None]
        problem = fit_problem(x, spec)
        if problem:
            raise DataError(f"{key}: {path.name} {problem}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(f"{key}: {path.name} contains NaN or Inf")
        if n is not None and len(x) != n:
            raise DataError(f"{key}: arrays in {path.name} have different sample counts")
        n = len(x)
    if not n:
        raise DataError(f"{key}: {path.name} holds no samples")
    return feeds


def take(feeds: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}


def n_samples(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def synthetic_input(shape, dtype, *, batch: int | None = None, rng: np.random.Generator | None = None,
                    int_high: int = 0) -> np.ndarray:
    """One input for a model the data does not fit: symbolic or unknown dims become 1.

    ``batch`` replaces the first dim. With ``rng``: floats standard normal, booleans ones, integers
    uniform in [0, int_high) (zeros when int_high is 0); without it, zeros of every dtype.
    """
    def fix(d):
        return d if isinstance(d, int) and d > 0 else 1

    shape = list(shape)
    dims = ([batch] if batch is not None else [fix(shape[0])] if shape else []) + [fix(d) for d in shape[1:]]
    dt = np.dtype(dtype)
    if rng is None:
        return np.zeros(dims, dtype=dt)
    if np.issubdtype(dt, np.floating):
        return rng.standard_normal(dims).astype(dt)
    if dt == np.bool_:
        return np.ones(dims, dtype=dt)
    if int_high:
        return rng.integers(0, int_high, size=dims).astype(dt)
    return np.zeros(dims, dtype=dt)


def synthetic_feeds(specs, batch: int, rng: np.random.Generator | None, *, int_high: int = 0) -> dict[str, np.ndarray]:
    """``synthetic_input`` for every spec (anything with .name, .shape, .dtype), in order (one rng stream)."""
    return {s.name: synthetic_input(s.shape, s.dtype, batch=batch, rng=rng, int_high=int_high) for s in specs}


def load_worker_inputs(spec):
    """A bench worker's (x, y) from the parent's .npy/.npz files (``spec``: a WorkerSpec), memory-mapped
    so that only the rows used are read."""
    x = None
    if spec.x and str(spec.x).endswith(".npz"):  # text: one array per model input
        with np.load(spec.x, allow_pickle=False) as z:
            x = {k: z[k] for k in z.files}
    elif spec.x:
        x = np.load(spec.x, mmap_mode="r")
    y = np.load(spec.y) if spec.y else None
    return x, y


def trim_to_longest(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A text batch cut to its longest sentence (infer pads to the batch's longest, never further)."""
    mask = feed.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return feed
    n = max(1, int(mask.sum(axis=1).max()))
    return {k: np.ascontiguousarray(v[:, :n]) if v.ndim == 2 else v for k, v in feed.items()}
