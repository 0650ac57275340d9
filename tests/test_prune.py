"""Channel pruning really shrinks the network (params, MACs, ONNX conv channels), keeps depthwise
graphs consistent, backs off on accuracy, and its weights reload through rebuild_pruned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecli.compression import TorchContext
from edgecli.config import DistillConfig, PipelineConfig, PruneConfig, SparsityConfig
from edgecli.errors import ConfigError
from tests.conftest import cli, edgecli, write_config


def _ctx_from_pipeline(p, **compress) -> TorchContext:
    """The trained model of a test pipeline, as the compress stage hands it to the torch steps."""
    from edgecli.data import load_splits
    from edgecli.models import rebuild_pruned
    from edgecli.training import evaluate, load_weights_file

    # these tests exercise pruning itself: no accuracy guard (drop up to 1.0) unless a test sets one (the default is 0.01)
    compress.setdefault("max_accuracy_drop", 1.0)
    cfg = PipelineConfig.model_validate({**p.cfg, "compress": compress})
    info = p.manifest("train")["model_info"]
    model = rebuild_pruned(info, load_weights_file(p.run_dir / "train" / "weights.safetensors"))
    splits = load_splits(cfg)
    val, _ = evaluate(model, splits.val.x, splits.val.y, info["num_classes"])
    return TorchContext(model, splits, cfg, info, info["num_classes"], val["accuracy"], quiet=True)


def _onnx_conv_out_channels(path) -> list[int]:
    import onnx

    m = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:  # a QDQ model feeds Conv its weight through DequantizeLinear
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    return [inits[n.input[1]][0] for n in m.graph.node if n.op_type == "Conv"]


def _export(model, x, path):
    import torch

    from edgecli.onnxio import export_onnx

    return export_onnx(model, (torch.as_tensor(x[:1]),), path)


def test_prune_halves_channels_in_torch_and_onnx_and_reloads(trained_cnn, tmp_path):
    import torch

    from edgecli.compression.prune import prune_step
    from edgecli.models import rebuild_pruned
    from edgecli.runtimes.ort import make_session, run_batched
    from edgecli.training import evaluate, predict_logits

    ctx = _ctx_from_pipeline(trained_cnn, max_accuracy_drop=0.05)
    original = ctx.model
    before_onnx = _export(original, ctx.splits.val.x, tmp_path / "before.onnx")
    d = prune_step(ctx, PruneConfig(ratio=0.5, finetune_epochs=3, distill=DistillConfig(alpha=0.5)))

    # channels [16, 32, 32] -> [8, 16, 16]: about a quarter of the conv weights remain
    assert [v["after"][1] for v in d["conv_channels"].values()] == [8, 16, 16]
    n_params = sum(p.numel() for p in ctx.model.parameters())
    assert n_params == d["params_after"] < 0.35 * d["params_before"]
    assert d["macs_after"] < 0.35 * d["macs_before"]
    assert d["failed_constraint"] is None and len(d["tries"]) == 1
    # the accuracy constraint held on validation, and test accuracy is still that of a working model
    assert d["val_accuracy_after"] >= ctx.baseline_val_accuracy - 0.05
    test, _ = evaluate(ctx.model, ctx.splits.test.x, ctx.splits.test.y, ctx.num_classes)
    assert test["accuracy"] > 0.85
    # the teacher (for later distill steps) is the unpruned model, untouched
    assert sum(p.numel() for p in ctx.teacher.parameters()) == d["params_before"]

    after_onnx = _export(ctx.model, ctx.splits.val.x, tmp_path / "after.onnx")
    assert _onnx_conv_out_channels(before_onnx) == [16, 32, 32]
    assert _onnx_conv_out_channels(after_onnx) == [8, 16, 16]
    assert after_onnx.stat().st_size < 0.4 * before_onnx.stat().st_size
    x = ctx.splits.test.x
    ref = predict_logits(ctx.model, x)
    np.testing.assert_allclose(run_batched(make_session(after_onnx), x), ref, atol=1e-4)

    # weights.safetensors of a pruned model reload into the registry architecture
    sd = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    again = rebuild_pruned(ctx.model_info, sd)
    np.testing.assert_allclose(predict_logits(again, x), ref, atol=1e-5)
    with pytest.raises(Exception, match="do not fit"):
        bad = dict(sd)
        bad["classifier.weight"] = torch.zeros(3, 3)
        rebuild_pruned(ctx.model_info, bad)


def test_accuracy_constraint_backs_off_and_keeps_the_best(trained_cnn):
    from edgecli.compression.prune import prune_step

    # no fine-tuning and no tolerated drop: 90% pruning cannot hold, so the ratio backs off
    ctx = _ctx_from_pipeline(trained_cnn, max_accuracy_drop=0.0)
    d = prune_step(ctx, PruneConfig(ratio=0.9, finetune_epochs=0, max_tries=3))
    tries = d["tries"]
    assert tries[0]["ratio"] == 0.9 and not tries[0]["passed"]
    assert tries[0]["accuracy_drop"] > 0.0
    assert tries[1]["ratio"] == pytest.approx(0.45)
    assert 2 <= len(tries) <= 3
    passing = [t for t in tries if t["passed"]]
    if passing:  # the most pruned candidate that held the constraint is kept: a success, not a failure (issue 12)
        chosen = max(passing, key=lambda t: t["ratio"])
        assert d["failed_constraint"] is None and "backed off" in d["backed_off"]
    else:
        assert d["failed_constraint"] and "max_accuracy_drop" in d["failed_constraint"]  # none held it: the most accurate is kept, and the report says so
        chosen = max(tries, key=lambda t: t["val_accuracy"])
        assert "every try" in d["failed_constraint"]
    assert d["ratio_achieved"] == chosen["ratio"] < 0.9
    assert sum(p.numel() for p in ctx.model.parameters()) == chosen["params"]
    # less pruning keeps more parameters
    assert tries[1]["params"] > tries[0]["params"]


def test_params_target_searches_the_channel_ratio(trained_cnn):
    from edgecli.compression.prune import prune_step

    ctx = _ctx_from_pipeline(trained_cnn)
    d = prune_step(ctx, PruneConfig(target="params", ratio=0.6, finetune_epochs=0, importance="l2", round_to=None))
    assert 1 - d["params_after"] / d["params_before"] >= 0.6
    # the search stops near the target instead of pruning far past it
    assert 1 - d["params_after"] / d["params_before"] < 0.7
    assert 0.2 < d["channel_ratio"] < 0.5


@pytest.mark.parametrize("opts", [
    {"importance": "taylor"}, {"importance": "bn_scale"}, {"global_pruning": True},
    {"iterative_steps": 3, "finetune_epochs": 3, "importance": "taylor", "distill": {"alpha": 0.7}},
    {"target": "macs", "ratio": 0.5, "round_to": 4},
], ids=["taylor", "bn_scale", "global", "iterative-taylor-distill", "macs-round_to"])
def test_importance_scope_and_schedule_variants_shrink_the_model(trained_cnn, opts):
    from edgecli.compression.prune import prune_step

    ctx = _ctx_from_pipeline(trained_cnn)
    d = prune_step(ctx, PruneConfig(**{"finetune_epochs": 1, **opts}))
    chans = [v["after"][1] for v in d["conv_channels"].values()]
    assert d["params_after"] < 0.5 * d["params_before"]
    assert sum(chans) < 0.8 * (16 + 32 + 32)
    if opts.get("round_to"):
        assert all(c % 4 == 0 for c in chans)
        assert 1 - d["macs_after"] / d["macs_before"] >= 0.5
    if opts.get("iterative_steps"):
        assert d["tries"][0]["finetune_epochs_run"] == 3  # one epoch after each of the 3 pruning steps
    assert d["val_accuracy_after"] > 0.3  # still a classifier, not a broken graph


def test_ignore_names_are_checked(trained_cnn):
    from edgecli.compression.prune import prune_step

    ctx = _ctx_from_pipeline(trained_cnn)
    with pytest.raises(ConfigError, match="did you mean 'classifier'"):
        prune_step(ctx, PruneConfig(ignore=["clasifier"], finetune_epochs=0))


def test_depthwise_mobilenet_prunes_consistently_and_exports(tmp_path):
    from edgecli.compression.prune import prune_step
    from edgecli.data import load_splits
    from edgecli.models import build_model, rebuild_pruned
    from edgecli.runtimes.ort import make_session, run_batched
    from edgecli.training import evaluate, fit, predict_logits

    cfg = PipelineConfig.model_validate({
        "name": "mb", "data": {"dataset": "digits", "max_samples": 600,
                               "preprocess": {"resize": [32, 32], "channels": 3}},
        "model": {"arch": "mobilenet", "args": {"width": 0.35, "last_channels": 64}},
        "train": {"epochs": 1, "lr": 0.004}, "compress": {"max_accuracy_drop": 1.0}})
    splits = load_splits(cfg)
    info = {"arch": "mobilenet", "args": cfg.model.args, "num_classes": 10, "input_shape": splits.spec.input_shape}
    model = build_model("mobilenet", info["input_shape"], 10, cfg.model.args)
    fit(model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, cfg.train, num_classes=10, seed=0,
        quiet=True)
    val, _ = evaluate(model, splits.val.x, splits.val.y, 10)
    ctx = TorchContext(model, splits, cfg, info, 10, val["accuracy"], quiet=True)
    before = _export(model, splits.val.x, tmp_path / "before.onnx")
    d = prune_step(ctx, PruneConfig(ratio=0.5, finetune_epochs=0))
    assert d["params_after"] < 0.45 * d["params_before"]
    for m in ctx.model.modules():  # depthwise convs stay depthwise: groups follow the channels
        if getattr(m, "groups", 1) > 1:
            assert m.groups == m.in_channels == m.out_channels
    after = _export(ctx.model, splits.val.x, tmp_path / "after.onnx")
    b, a = _onnx_conv_out_channels(before), _onnx_conv_out_channels(after)
    assert len(a) == len(b) and sum(a) < 0.6 * sum(b)
    x = splits.test.x[:64]
    ref = predict_logits(ctx.model, x)
    np.testing.assert_allclose(run_batched(make_session(after), x), ref, atol=1e-4)
    again = rebuild_pruned(info, ctx.model.state_dict())
    np.testing.assert_allclose(predict_logits(again, x), ref, atol=1e-5)


def test_sparsity_shrinks_compressed_size_not_shapes(trained_cnn):
    from edgecli.compression.prune import sparsity_step

    ctx = _ctx_from_pipeline(trained_cnn)
    shapes = {k: tuple(v.shape) for k, v in ctx.model.state_dict().items()}
    d = sparsity_step(ctx, SparsityConfig(ratio=0.7, finetune_epochs=1))
    assert d["ratio_achieved"] == pytest.approx(0.7, abs=0.01)
    assert {k: tuple(v.shape) for k, v in ctx.model.state_dict().items()} == shapes
    assert not any("_orig" in k or "_mask" in k for k in ctx.model.state_dict())
    assert d["deflated_bytes_after"] < 0.75 * d["deflated_bytes_before"]
    assert abs(d["onnx_bytes_after"] - d["onnx_bytes_before"]) < 0.02 * d["onnx_bytes_before"]
    assert "none" in d["speedup"]
    assert d["val_accuracy_after"] > 0.8


def test_compress_cli_prune_publishes_pruned_weights_and_onnx(trained_cnn, copy_pipeline):
    from edgecli.models import rebuild_pruned
    from edgecli.training import load_weights_file

    p = copy_pipeline(trained_cnn)
    p.cfg["compress"] = {"steps": [{"prune": {"ratio": 0.5, "finetune_epochs": 2,
                                              "distill": {"alpha": 0.5, "temperature": 4.0}}}],
                         # the pruning mechanics, not the latency choice: under `objective: latency` whether
                         # this tiny CNN's pruned model is confirmed faster depends on the machine's noise
                         "max_accuracy_drop": 0.05, "objective": "size"}
    write_config(p.config, p.cfg)
    r = cli("compress", "-c", str(p.config), "-q", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    out = p.run_dir / "compress"
    report = json.loads((out / "report.json").read_text())
    step = report["steps"][0]
    assert step["kind"] == "prune"
    assert step["after"]["params"] < 0.35 * step["before"]["params"]
    assert step["details"]["tries"][0]["ratio"] == 0.5
    assert _onnx_conv_out_channels(out / "model.onnx") == [8, 16, 16]
    model = rebuild_pruned(p.manifest("train")["model_info"], load_weights_file(out / "weights.safetensors"))
    assert [m.out_channels for m in model.modules() if hasattr(m, "out_channels")] == [8, 16, 16]


@pytest.mark.slow
def test_resnet8_full_recipe_prune_distill_quantize(tmp_path):
    """Issue 4's goal on digits-resnet8: prune 0.5 + distillation + fine-tune, then distill, then quantize,
    in one `edgecli compress`: <= 35% params and MACs, accuracy drop <= 0.01 (about 3 minutes)."""
    import yaml

    from edgecli.data import load_splits
    from edgecli.models import rebuild_pruned
    from edgecli.training import evaluate, load_weights_file
    from tests.conftest import REPO, Pipeline

    cfg = yaml.safe_load((REPO / "configs" / "digits-resnet8.yaml").read_text())
    cfg["artifacts_dir"] = str(tmp_path / "artifacts")
    cfg["compress"] = {"input": "train", "max_accuracy_drop": 0.01, "objective": "latency", "steps": [
        {"prune": {"importance": "l1", "ratio": 0.5, "finetune_epochs": 10,
                   "distill": {"alpha": 0.7, "temperature": 4.0}}},
        {"distill": {"alpha": 0.7, "temperature": 4.0, "epochs": 5, "lr": 0.001}},
        {"quantize": {"mode": "static", "format": "qdq", "per_channel": True,
                      "calibration": {"method": "minmax", "samples": 256}}}]}
    p = Pipeline(tmp_path, write_config(tmp_path / "config.yaml", cfg), cfg)
    for stage in ("train", "compress"):
        r = edgecli(stage, "-c", str(p.config), "-q", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    report = json.loads((p.run_dir / "compress" / "report.json").read_text())
    assert [s["kind"] for s in report["steps"]] == ["prune", "distill", "quantize"]
    prune = report["steps"][0]
    assert prune["after"]["params"] <= 0.35 * prune["before"]["params"]
    assert prune["after"]["macs"] <= 0.35 * prune["before"]["macs"]
    assert prune["details"]["ratio_achieved"] == 0.5
    train_val = p.manifest("train")["metrics"]["val_accuracy"]
    assert report["final"]["score"] >= train_val - 0.01
    # test accuracy of the published PyTorch weights (pruned shapes) against the trained model
    from edgecli.config import PipelineConfig

    splits = load_splits(PipelineConfig.model_validate(cfg))
    info = p.manifest("train")["model_info"]
    pruned = rebuild_pruned(info, load_weights_file(p.run_dir / "compress" / "weights.safetensors"))
    trained = rebuild_pruned(info, load_weights_file(p.run_dir / "train" / "weights.safetensors"))
    acc = [evaluate(m, splits.test.x, splits.test.y, 10)[0]["accuracy"] for m in (trained, pruned)]
    assert acc[1] >= acc[0] - 0.01
    assert max(_onnx_conv_out_channels(p.run_dir / "compress" / "model.onnx")) <= 32
