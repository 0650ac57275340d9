"""What the compress stage scores and calibrates on, decided once per run.

The validation split when the pipeline's data fits the model input; else the user's calibration
file (fidelity to the input model). Calibration feeds for each quantize step come from its own
``calibration.data`` file, or the train split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecli.errors import DataError


@dataclass
class EvalData:
    """What every step is scored and timed on."""

    eval_feeds: dict | None = None
    labels: object = None
    metric: str = "accuracy"
    splits: object = None  # edgecli.data.Splits, when the pipeline's data fits the model
    fit_note: str = ""
    kind_note: str = ""
    embedding: bool = False


def subset(n: int, k: int | None, seed: int) -> np.ndarray:
    """``k`` of ``n`` row indices, sorted, drawn with ``seed`` (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def split_feeds(x, inputs, idx) -> dict[str, np.ndarray]:
    """Model feeds for rows ``idx`` of a split: one array, or a dict keyed by input name (text)."""
    if isinstance(x, dict):
        return {i.name: np.ascontiguousarray(x[i.name][idx]) for i in inputs}
    return {inputs[0].name: np.ascontiguousarray(x[idx])}


def load_calibration_files(cfg, inputs) -> dict[str, dict]:
    """Every quantize step's ``calibration.data`` file, read once (by the first step that names it)."""
    from edgecli.runtimes.feeds import load_input_file

    out: dict[str, dict] = {}
    for i, st in enumerate(cfg.compress.steps):
        c = st.quantize.calibration.data if st.kind == "quantize" else None
        if c and c not in out:
            out[c] = load_input_file(Path(c), inputs, f"compress.steps.{i}.quantize.calibration.data")
    return out


def _fit_problem(splits, inputs) -> str | None:
    """Why the pipeline's splits cannot feed this model, or None."""
    from edgecli.runtimes.feeds import fit_problem

    if isinstance(splits.val.x, dict):  # text: the tokenizer's arrays feed the model's named inputs
        problem = None
        missing = [i.name for i in inputs if i.name not in splits.val.x]
        if missing:
            problem = f"the preprocessing gives {sorted(splits.val.x)}, not the model input(s) {missing}"
        for spec in inputs:
            problem = problem or fit_problem(splits.val.x[spec.name][:1], spec)
        return problem
    if len(inputs) != 1:
        return f"the model has {len(inputs)} inputs"
    return fit_problem(splits.val.x[:1], inputs[0])


def eval_data(cfg, inputs, calib_file_feeds: dict | None, model_path: Path, info: dict | None) -> EvalData:
    """Validation split when the pipeline's data fits the model input, else the user's inputs (fidelity).

    The metric follows from the model's output (``output_kind``): class scores are scored by accuracy
    (or top-1 agreement without labels), embeddings and regressors by the worst per-sample cosine.
    """
    from edgecli.compression.quantize import output_kind
    from edgecli.onnxio import load_onnx
    from edgecli.runtimes.feeds import n_samples, take

    d = EvalData()
    try:
        from edgecli.data import load_splits

        splits = load_splits(cfg)
        problem = _fit_problem(splits, inputs)
        if problem is None:
            d.splits = splits
    except DataError as e:
        problem = e.message
    kind, why = output_kind(load_onnx(model_path, load_external=False), info,
                            d.splits.num_classes if d.splits is not None else None)
    d.kind_note = f"metric {'cosine_min' if kind == 'embedding' else 'accuracy/top-1'} chosen from the output: {why}"
    d.embedding = kind == "embedding"
    if d.splits is not None:
        idx = subset(len(d.splits.val), cfg.compress.eval_samples, cfg.seed)
        d.eval_feeds = split_feeds(d.splits.val.x, inputs, idx)
        d.labels = d.splits.val.y[idx]
        if d.embedding:  # not class scores: fidelity of the outputs to the FP32 model, per sample
            d.labels, d.metric = None, "cosine_min"
        return d
    d.fit_note = f"the pipeline's data does not fit the model input ({problem}); scoring fidelity to the input model"
    d.metric = "cosine_min" if d.embedding else "fidelity"
    if calib_file_feeds is None:
        raise DataError(
            f"compress: {d.fit_note.split(';')[0]}, and no calibration.data file gives model inputs to score on",
            hint="set compress.steps.N.quantize.calibration.data to an .npy/.npz of model inputs",
        )
    n = n_samples(calib_file_feeds)
    idx = subset(n, cfg.compress.eval_samples, cfg.seed)
    d.eval_feeds = take(calib_file_feeds, idx)
    return d


def calibration(cfg, st_opts, key: str, inputs, data: EvalData,
                files: dict[str, dict]) -> tuple[dict | None, str | None, str]:
    """(feeds, problem, source) for one quantize step; ``files`` from ``load_calibration_files``."""
    from edgecli.runtimes.feeds import n_samples, take

    cal = st_opts.calibration
    if cal.data:
        feeds = files[cal.data]
        idx = np.arange(min(cal.samples, n_samples(feeds)))
        return take(feeds, idx), None, f"{cal.data} ({len(idx)} samples)"
    if data.splits is None:
        return None, (f"{key}.calibration.data: static quantization needs calibration inputs; the pipeline's data "
                      "does not fit this model, so give an .npy/.npz of model inputs"), ""
    idx = subset(len(data.splits.train), cal.samples, cfg.seed)
    return split_feeds(data.splits.train.x, inputs, idx), None, f"train split ({len(idx)} samples)"
