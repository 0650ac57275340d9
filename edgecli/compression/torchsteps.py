"""The compress stage's PyTorch-level steps (prune, distill, sparsity), run in order on the trained model.

Each step transforms ``TorchContext.model``; here every step's output is exported to ONNX (parity
checked) and measured like any other step: params, MACs, ONNX bytes, score and p50 latency.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgecli.errors import ArtifactError, ConfigError

TORCH_STEPS = ("prune", "distill", "sparsity")
STEP_FUNCS = {"prune": "edgecli.compression.prune:prune_step", "distill": "edgecli.compression.distill:distill_step",
              "sparsity": "edgecli.compression.prune:sparsity_step"}


def load_step_func(kind: str, key: str):
    import importlib

    mod, _, attr = STEP_FUNCS[kind].partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}: '{kind}' steps are not available in this build of edgecli "
                          f"({STEP_FUNCS[kind]} is missing); use quantize steps only") from None


def measure_torch(model, info, cfg, splits, work: Path, tag: str, data) -> dict:
    """Export a torch model to ONNX (parity checked) and measure it like any step output."""
    from edgecli.compression.quantize import Scorer
    from edgecli.models.zoo import count_macs, count_params
    from edgecli.onnxio import model_bytes, save_model_files

    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    par = save_model_files(d, model, cfg, info, splits.test.x, cfg.train.opset, cfg.train.parity_atol,
                           f"compress {tag} parity (ONNX Runtime vs PyTorch)")
    sc = Scorer(data.eval_feeds, data.labels, cfg.compress.threads).score(d / "model.onnx")
    return {"dir": d, "params": count_params(model), "macs": count_macs(model, info["input_shape"]),
            "bytes": model_bytes(d / "model.onnx"), "score": sc["score"], "parity": par}


def _trained_model(cfg, store):
    """(model, model_info, train manifest, weights path) of the train stage, the architecture checked."""
    from edgecli.models import build_from_info, load_weights_into, trusted_archs, trusted_info
    from edgecli.training import load_weights_file

    man = store.manifest("train")
    info = man.get("model_info")
    if not info:
        raise ArtifactError("train manifest has no model_info; rerun `edgecli train -c <config> --force`")
    info = trusted_info(info, trusted_archs(cfg), str(store.stage_dir("train") / "manifest.json"))
    model = build_from_info(info)
    wpath = store.require("train", "weights.safetensors")
    load_weights_into(model, load_weights_file(wpath), info["arch"], str(wpath))
    return model.eval(), info, man, wpath


def run_torch_steps(cfg, store, work: Path, data, quiet: bool, log) -> tuple[Path, list[dict], object, list[str]]:
    """Run prune/distill/sparsity in order; return (onnx path, step records, final model, notes)."""
    from edgecli.compression import TorchContext
    from edgecli.compression.quantize import time_p50

    model, info, man, wpath = _trained_model(cfg, store)
    splits = data.splits
    before = measure_torch(model, info, cfg, splits, work, "step-input", data)
    ctx = TorchContext(model=model, splits=splits, cfg=cfg, model_info=info, num_classes=info["num_classes"],
                       baseline_val_accuracy=float(man.get("metrics", {}).get("val_accuracy", before["score"])),
                       quiet=quiet, teacher_weights=wpath)
    records = []
    feed1 = {k: v[:1] for k, v in data.eval_feeds.items()}
    for i, st in enumerate(cfg.compress.steps):
        if st.kind not in TORCH_STEPS:
            break
        key = f"compress.steps.{i}"
        fn = load_step_func(st.kind, key)
        log(f"step {i}: {st.kind}")
        details = fn(ctx, st.options) or {}
        after = measure_torch(ctx.model, info, cfg, splits, work, f"step{i}-{st.kind}", data)
        p0, p1 = time_p50([before["dir"] / "model.onnx", after["dir"] / "model.onnx"], feed1, cfg.compress.threads)
        before["p50_ms"], after["p50_ms"] = p0, p1
        records.append({"index": i, "kind": st.kind, "options": st.options.model_dump(mode="json"),
                        "before": _public(before), "after": _public(after), "details": _jsonable(details),
                        "metric": data.metric})
        before = after
    return before["dir"], records, ctx.model, list(ctx.notes)


def _public(m: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items() if k not in ("dir", "parity")}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
