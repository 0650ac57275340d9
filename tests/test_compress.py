"""End-to-end tests of the compress stage on tiny models, in process (real training, real ONNX Runtime)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.conftest import cli, tiny_config, write_config


def _report(run_dir):
    return json.loads((run_dir / "compress" / "report.json").read_text())


def _accuracy(path, x, y):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x})[0]
    return float((out.argmax(-1) == y).mean())


def _val(cfg_path):
    from edgecli.config import load_config
    from edgecli.data import load_splits

    return load_splits(load_config(cfg_path))


def test_static_quantization_of_trained_cnn(trained_cnn, copy_pipeline):
    p = copy_pipeline(trained_cnn)
    p.cfg["compress"] = {"steps": [{"quantize": {"mode": "static", "calibration": {"samples": 64}}}],
                         "max_accuracy_drop": 0.02, "objective": "size"}
    write_config(p.config, p.cfg)
    r = cli("compress", "-c", str(p.config), cwd=p.dir)
    assert r.returncode == 0, r.stderr
    assert "static qdq per-channel" in r.stdout  # the candidate table
    out = p.run_dir / "compress"
    for f in ("model.onnx", "report.json", "manifest.json", "weights.safetensors"):
        assert (out / f).is_file(), f
    rep = _report(p.run_dir)
    step = rep["steps"][0]
    assert step["chosen"] == "static qdq per-channel"
    assert rep["final"]["size_ratio"] <= 0.5  # INT8 weights; scales and QDQ nodes weigh more on a tiny net
    m = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    meta = {x.key: x.value for x in m.metadata_props}
    assert json.loads(meta["edgecli.model_info"])["arch"] == "cnn"  # infer/export still know the preprocessing
    # the reported accuracy is what the published file really scores on the validation split
    sp = _val(p.config)
    acc = _accuracy(out / "model.onnx", sp.val.x, sp.val.y)
    assert acc == pytest.approx(step["after"]["score"], abs=1e-5)
    assert step["before"]["score"] - acc <= 0.02
    cand = step["candidates"][1]
    # the published file is the candidate plus edgecli's metadata (a few hundred bytes)
    assert cand["p50_ms"] > 0 and 0 <= (out / "model.onnx").stat().st_size - cand["bytes"] < 1024
    assert rep["final"]["bytes"] == (out / "model.onnx").stat().st_size
    man = p.manifest("compress")
    assert man["upstream"]["train"] and man["metrics"]["size_ratio"] == rep["final"]["size_ratio"]
    # unchanged config and inputs: skipped
    r2 = cli("compress", "-c", str(p.config), cwd=p.dir)
    assert r2.returncode == 0 and "skipped" in r2.stderr


def test_forced_accuracy_drop_excludes_the_most_helpful_node(trained_cnn, copy_pipeline):
    p = copy_pipeline(trained_cnn)
    p.cfg["compress"] = {"steps": [{"quantize": {"mode": "static", "per_channel": False,
                                                 "calibration": {"samples": 1}}}],
                         "max_accuracy_drop": 0.0, "objective": "size"}
    write_config(p.config, p.cfg)
    r = cli("compress", "-c", str(p.config), cwd=p.dir)
    assert r.returncode == 0, r.stderr
    rep = _report(p.run_dir)
    step = rep["steps"][0]
    first = step["candidates"][1]
    assert "max_accuracy_drop" in first["failed_constraints"] and first["accuracy_drop"] > 0
    assert step["sensitivity"], "a sensitivity pass ranks the quantized nodes"
    # objective size: the nodes that help are ranked by score brought back per byte kept in float
    helping = [s for s in step["sensitivity"] if s["gain"] > 0]
    assert any(s["extra_bytes"] > 0 for s in step["sensitivity"])  # a conv's weights kept in float cost bytes
    per_byte = [s["gain"] / max(s["extra_bytes"], 1024) for s in helping]
    assert per_byte == sorted(per_byte, reverse=True)
    assert step["sensitivity"][: len(helping)] == helping
    # seed 0: keeping the one most helpful node in float brings the drop to zero, so that candidate is
    # chosen (not the FP32 input); nothing is kept aside as the best rejected candidate
    assert step["chosen"] == "static qdq -1 node", step["verdict"]
    chosen = next(c for c in step["candidates"] if c["chosen"])
    assert chosen["name"] == step["chosen"] and chosen["excluded_nodes"] == [step["sensitivity"][0]["node"]]
    assert chosen["accuracy_drop"] <= 0.0 and not chosen["failed_constraints"]
    assert step["failed_constraint"] is None and "kept FP32" not in step["verdict"]
    assert not (p.run_dir / "compress" / "candidate_best.onnx").exists()
    sp = _val(p.config)
    acc = _accuracy(p.run_dir / "compress" / "model.onnx", sp.val.x, sp.val.y)
    assert acc >= step["before"]["score"] - 1e-9


def _export_external(tmp_path, model, shape, name="ext"):
    """A model exported 'elsewhere': plain torch.onnx.export, weights moved to external data."""
    import torch

    d = tmp_path / name
    d.mkdir()
    path = d / "model.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    m = onnx.load(str(path))
    onnx.save(m, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (d / "model.onnx.data").is_file()
    return path


def test_external_onnx_with_external_data_and_npy_calibration(trained_cnn, tmp_path):
    from edgecli.models.zoo import CNN
    from edgecli.training import load_weights_file

    net = CNN([1, 8, 8], 10, channels=[16, 32, 32])
    net.load_state_dict(load_weights_file(trained_cnn.run_dir / "train" / "weights.safetensors"))
    path = _export_external(tmp_path, net, [1, 8, 8])
    sp = _val(trained_cnn.config)
    np.save(tmp_path / "calib.npy", sp.train.x[:48])
    cfg = tiny_config("ext", tmp_path / "artifacts")
    cfg["compress"] = {"input": str(path), "objective": "size", "max_accuracy_drop": 0.03,
                       "steps": [{"quantize": {"mode": "static", "calibration": {"data": str(tmp_path / "calib.npy")}}}]}
    cp = write_config(tmp_path / "c.yaml", cfg)
    r = cli("compress", "-c", str(cp), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "artifacts" / "ext"
    rep = _report(run)
    assert rep["metric"] == "accuracy"  # the pipeline's digits fit the model's input
    ext_bytes = path.stat().st_size + (path.parent / "model.onnx.data").stat().st_size
    assert rep["input"]["bytes"] == ext_bytes
    assert rep["steps"][0]["calibration"].endswith("(48 samples)")
    assert rep["steps"][0]["chosen"], rep["steps"][0]["verdict"]
    out = run / "compress" / "model.onnx"
    assert not (run / "compress" / "weights.safetensors").exists()
    assert rep["final"]["bytes"] == out.stat().st_size < ext_bytes * 0.5
    meta = {x.key: x.value for x in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["edgecli.model_info"])["input_shape"] == [1, 8, 8]


def test_external_model_without_fitting_data_scores_fidelity(tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5))
    path = _export_external(tmp_path, net, [3, 12, 12])
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((64, 3, 12, 12)).astype(np.float32))
    cfg = tiny_config("fid", tmp_path / "artifacts")
    cfg["compress"] = {"input": str(path), "objective": "size",
                       "steps": [{"quantize": {"mode": "static", "calibration": {"data": str(tmp_path / "x.npy")}}}]}
    cp = write_config(tmp_path / "c.yaml", cfg)
    r = cli("compress", "-c", str(cp), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = _report(tmp_path / "artifacts" / "fid")
    assert rep["metric"] == "fidelity"
    cand = rep["steps"][0]["candidates"][1]
    assert 0.5 < cand["top1_agreement"] <= 1.0 and cand["cosine_mean"] > 0.9
    assert json.loads(r.stdout)["metrics"]["metric"] == "fidelity"


def test_bad_calibration_file_is_a_one_line_error(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 8, 8), np.float32))
    cfg = tiny_config("bad", tmp_path / "artifacts")
    cfg["compress"] = {"steps": [{"quantize": {"mode": "static", "calibration": {"data": str(tmp_path / "bad.npy")}}}]}
    cp = write_config(tmp_path / "c.yaml", cfg)
    # the check runs on the input model, so make one: an external single-channel model
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    path = _export_external(tmp_path, net, [1, 8, 8])
    cfg["compress"]["input"] = str(path)
    write_config(cp, cfg)
    r = cli("compress", "-c", str(cp), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and "calibration.data" in lines[0] and "dim 1: 3 != 1" in lines[0], r.stderr
    assert not (tmp_path / "artifacts" / "bad" / "compress").exists()


def test_torch_step_after_quantize_is_a_config_error(tmp_path):
    cfg = tiny_config("order", tmp_path / "artifacts")
    cfg["compress"] = {"steps": [{"quantize": {"mode": "static"}}, {"prune": {"ratio": 0.5}}]}
    cp = write_config(tmp_path / "c.yaml", cfg)
    r = cli("compress", "-c", str(cp), cwd=tmp_path)
    assert r.returncode == 2
    assert "compress.steps.1" in r.stderr and "before every quantize step" in r.stderr
