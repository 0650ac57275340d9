"""export stage, in process (cli): the bundle (model.onnx, model.ort, required_operators.config, card.json), parity, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import Pipeline, cli, copy_of, write_config


@pytest.fixture(scope="module")
def exported(trained_cnn, tmp_path_factory) -> Pipeline:
    """The session's trained CNN copied once for this module and exported from its train stage."""
    p = copy_of(trained_cnn, tmp_path_factory.mktemp("exported") / "pipe")
    r = cli("export", "-c", str(p.config), "-q", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    return p


def _test_inputs(p: Pipeline, n: int = 64) -> np.ndarray:
    from edgecli.config import load_config
    from edgecli.data import load_splits

    return load_splits(load_config(p.config)).test.x[:n]


def test_bundle_files_card_and_checker(exported):
    import onnx

    from edgecli.artifacts import sha256_file

    d = exported.run_dir / "export"
    assert {"model.onnx", "model.ort", "required_operators.config", "card.json", "manifest.json"} <= {
        f.name for f in d.iterdir()}
    assert not list(d.glob("*.data"))  # weights inside the file
    onnx.checker.check_model(str(d / "model.onnx"), full_check=True)
    card = json.loads((d / "card.json").read_text())
    man = exported.manifest("export")
    train_info = exported.manifest("train")["model_info"]
    # what a deployer needs
    assert card["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert card["output_names"] == ["logits"]
    assert card["class_names"] == [str(i) for i in range(10)]
    assert card["preprocess"] == train_info["preprocess"]
    assert card["opset"] == 17
    assert card["lineage"]["train"] == sha256_file(exported.run_dir / "train" / "manifest.json")
    sha = sha256_file(d / "model.onnx")
    assert card["files"]["model.onnx"] == {"bytes": (d / "model.onnx").stat().st_size, "sha256": sha}
    assert man["outputs"]["model.onnx"] == sha and man["metrics"]["sha256"] == sha
    par = card["parity"]
    assert par["passed"] and par["mode"] == "float" and par["source"].startswith("test split")
    assert par["max_abs_diff"] <= 1e-4 and par["top1_agreement"] == 1.0 and par["samples"] > 50
    # the same card (less the fields describing the final files) lives inside the model
    meta = {p.key: p.value for p in onnx.load(str(d / "model.onnx")).metadata_props}
    embedded = json.loads(meta["edgecli.card"])
    assert embedded == {k: v for k, v in card.items() if k not in ("files", "ort_check", "targets", "auto")}
    assert json.loads(meta["edgecli.model_info"]) == train_info
    model = onnx.load(str(d / "model.onnx"))
    used = {n.domain for n in model.graph.node}
    assert {o.domain for o in model.opset_import} <= used | {""}  # no declared-but-unused domains
    ops = (d / "required_operators.config").read_text()
    assert "Gemm" in ops or "MatMul" in ops


def test_ort_format_matches_onnx_and_batch_is_dynamic(exported):
    import onnxruntime as ort

    d = exported.run_dir / "export"
    x = _test_inputs(exported)
    outs = {}
    for name in ("model.onnx", "model.ort"):
        s = ort.InferenceSession(str(d / name), providers=["CPUExecutionProvider"])
        outs[name] = s.run(None, {"input": x})[0]
        assert s.run(None, {"input": x[:1]})[0].shape == (1, 10)  # the batch axis stayed dynamic
    np.testing.assert_allclose(outs["model.ort"], outs["model.onnx"], atol=1e-5)
    assert (outs["model.ort"].argmax(1) == outs["model.onnx"].argmax(1)).all()
    # and both agree with the train stage's model
    ref = ort.InferenceSession(str(exported.run_dir / "train" / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(outs["model.onnx"], ref, atol=1e-4)


def test_skip_then_opset_conversion(copy_pipeline, exported):
    p = copy_pipeline(exported)
    r = cli("export", "-c", str(p.config), cwd=p.dir)
    assert r.returncode == 0 and "up to date" in r.stderr
    r = cli("export", "-c", str(p.config), "-q", "--set", "export.opset=18", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    card = json.loads((p.run_dir / "export" / "card.json").read_text())
    assert card["opset"] == 18 and card["parity"]["passed"]
    # a conversion ONNX cannot do is a config error naming the key, and the old bundle stays
    r = cli("export", "-c", str(p.config), "--set", "export.opset=13", cwd=p.dir)
    assert r.returncode == 2
    assert "export.opset: cannot convert this model from opset 17 to 13" in r.stderr
    assert json.loads((p.run_dir / "export" / "card.json").read_text())["opset"] == 18


def _randomized(src, dst):
    """The train model plus fresh random noise on its logits: it claims to be the train model
    (same metadata) but never gives the same output twice, as a broken or tampered model would not."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    out = m.graph.output[0].name
    m.graph.node[-1].output[0] = out + "_clean"
    m.graph.node.extend([
        helper.make_node("RandomUniformLike", [out + "_clean"], [out + "_noise"], low=0.0, high=5.0),
        helper.make_node("Add", [out + "_clean", out + "_noise"], [out]),
    ])
    onnx.save(m, str(dst))


def test_parity_failure_publishes_nothing(copy_pipeline, trained_cnn):
    p = copy_pipeline(trained_cnn)
    bad = p.dir / "tampered.onnx"
    _randomized(p.run_dir / "train" / "model.onnx", bad)
    r = cli("export", "-c", str(p.config), "--set", f"export.input={bad}", cwd=p.dir)
    assert r.returncode == 1, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("check failed")][0]
    assert "max abs diff" in line and "top-1 agreement" in line and "nothing was published" in line
    assert not (p.run_dir / "export").exists()
    assert not list(p.run_dir.glob(".export*"))  # no temp dir left behind


def test_foreign_model_without_metadata(copy_pipeline, trained_cnn):
    import onnx

    p = copy_pipeline(trained_cnn)
    m = onnx.load(str(p.run_dir / "train" / "model.onnx"))
    del m.metadata_props[:]
    foreign = p.dir / "foreign.onnx"
    onnx.save(m, str(foreign))
    r = cli("export", "-c", str(p.config), "-q", "--set", f"export.input={foreign}", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    card = json.loads((p.run_dir / "export" / "card.json").read_text())
    assert card["preprocess"] is None and card["class_names"] is None
    assert card["parity"]["source"].startswith("seeded random inputs") and card["parity"]["passed"]
    assert card["lineage"] == {"file:foreign.onnx": __import__("edgecli.artifacts").artifacts.sha256_file(foreign)}


def test_bad_input_files_are_usage_errors(copy_pipeline, trained_cnn):
    p = copy_pipeline(trained_cnn)
    trunc = p.dir / "trunc.onnx"
    trunc.write_bytes((p.run_dir / "train" / "model.onnx").read_bytes()[:500])
    r = cli("export", "-c", str(p.config), "--set", f"export.input={trunc}", cwd=p.dir)
    assert r.returncode == 2 and "not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr
    r = cli("export", "-c", str(p.config), "--set", "export.input=bench", cwd=p.dir)
    assert r.returncode == 2 and "export.input" in r.stderr
    shutil.rmtree(p.run_dir / "train")
    r = cli("export", "-c", str(p.config), cwd=p.dir)
    assert r.returncode == 2 and "export.input: none of compress, train has been run" in r.stderr


@pytest.mark.slow
def test_quantized_compress_input(copy_pipeline, trained_cnn):
    """A static QDQ model from compress: parity reports agreement and accuracy delta; it still runs."""
    p = copy_pipeline(trained_cnn)
    cfg = dict(p.cfg, compress={"input": "train", "steps": [
        {"quantize": {"mode": "static", "force": True, "calibration": {"samples": 64}}}]})
    write_config(p.config, cfg)
    assert cli("compress", "-c", str(p.config), "-q", cwd=p.dir).returncode == 0
    r = cli("export", "-c", str(p.config), "-q", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    card = json.loads((p.run_dir / "export" / "card.json").read_text())
    par = card["parity"]
    assert card["quantized"] and par["mode"] == "quantized" and par["top1_agreement"] >= 0.99
    assert abs(par["accuracy_delta"]) <= 0.01
    assert card["lineage"]["compress"] and card["lineage"]["train"]


def test_dedupe_initializers_and_unused_opsets(tmp_path):
    """Identical weights are stored once and unused domain imports dropped; the outputs do not change."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgecli.onnxio import dedupe_initializers, drop_unused_opsets

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    inits = [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2"),
             numpy_helper.from_array(w + 1, "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("MatMul", ["x", "w3"], ["c"]), helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    before = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert dedupe_initializers(m) == 1
    assert sorted(t.name for t in m.graph.initializer) == ["w1", "w3"]
    assert drop_unused_opsets(m) == ["com.microsoft"]
    onnx.checker.check_model(m, full_check=True)
    after = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)
