"""edgecli.compression.quantize (the job) and quantize_modes (the table) on small hand-made ONNX graphs
(real ONNX Runtime, no training)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecli.compression import quantize as q
from edgecli.compression.quantize_modes import MODES
from edgecli.config import QuantizeConfig
from edgecli.errors import DataError
from edgecli.runtimes.feeds import load_input_file


def _matmul_mlp(path, d=64, h=128, classes=10, seed=0):
    """x[N,d] -> MatMul -> Add -> Relu -> MatMul -> logits: the graph shape of transformer FFNs."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(h, np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((h, classes)) / np.sqrt(h)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], [w1, b1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.fixture
def mlp(tmp_path):
    x = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)
    return _matmul_mlp(tmp_path / "mlp.onnx"), {"x": x}


def _job(src, work, feeds, **opts):
    work.mkdir(exist_ok=True)
    ref = q.Scorer(feeds, None, 1).outputs(src)
    sc = q.Scorer(feeds, None, 1, reference=ref)
    return q.QuantizeJob(src, work, QuantizeConfig(**opts), scorer=sc, calib=feeds, calib_problem=None,
                         feed1={k: v[:1] for k, v in feeds.items()}, threads=1, max_drop=None,
                         objective="size", key="compress.steps.0.quantize")


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("mode,op", [("dynamic", "DynamicQuantizeMatMul"), ("int4_weight_only", "MatMulNBits"),
                                     ("static", "QuantizeLinear")])
def test_modes_on_a_matmul_model_keep_fidelity(mlp, tmp_path, mode, op):
    src, feeds = mlp
    out = _job(src, tmp_path / "w", feeds, mode=mode, force=True).run()
    assert out.chosen is not None, out.verdict
    ops = _ops(out.chosen.path)
    assert op in ops or (mode == "dynamic" and "MatMulInteger" in ops), ops
    assert out.chosen.bytes < out.input.bytes * (0.45 if mode != "static" else 0.5)
    s = out.chosen.scores  # 4-bit weights of a random net are the coarsest of the three
    assert s["cosine_mean"] > 0.98 and s["cosine_min"] > 0.9 and s["top1_agreement"] >= 0.85, s


def test_fp16_keeps_float32_inputs_and_outputs(mlp, tmp_path):
    src, feeds = mlp
    out = _job(src, tmp_path / "w", feeds, mode="fp16", force=True).run()
    m = onnx.load(str(out.chosen.path))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)
    assert out.chosen.scores["cosine_min"] > 0.999


def test_auto_reports_every_mode_and_int4_not_applicable_on_gemm_free_conv(tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    src = tmp_path / "conv.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 8, 8),), str(src), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    feeds = {"x": np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)}
    out = _job(src, tmp_path / "w", feeds, mode="auto").run()
    by = {c.name: c for c in out.candidates}
    assert {"static qdq per-channel", "static qdq per-tensor", "fp16", "dynamic", "int4 weight-only"} <= set(by)
    assert not by["dynamic"].applicable and "ConvInteger" in by["dynamic"].reason
    assert not by["int4 weight-only"].applicable
    for c in out.candidates:  # each candidate says why it was or was not chosen
        assert c.reason, c.name


def test_latency_objective_never_picks_a_slower_candidate(mlp, tmp_path):
    src, feeds = mlp
    job = _job(src, tmp_path / "w", feeds, mode="fp16")
    job.objective = "latency"
    out = job.run()
    c = out.candidates[0]
    if out.chosen is None:
        assert "latency" in c.failed and "not faster" in c.reason
    else:  # only when measured faster than the input by the noise margin
        assert c.p50_ms < out.input.p50_ms * (1 - q.MIN_SPEEDUP)


def test_input_file_validation(tmp_path, mlp):
    src, _ = mlp
    ins = q.model_inputs(onnx.load(str(src)))
    np.save(tmp_path / "f64.npy", np.zeros((4, 64)))
    with pytest.raises(DataError, match="dtype float64"):
        load_input_file(tmp_path / "f64.npy", ins, "k")
    np.save(tmp_path / "shape.npy", np.zeros((4, 32), np.float32))
    with pytest.raises(DataError, match="dim 1: 32 != 64"):
        load_input_file(tmp_path / "shape.npy", ins, "k")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="refused"):
        load_input_file(tmp_path / "obj.npy", ins, "k")
    np.savez(tmp_path / "ok.npz", x=np.ones((3, 64), np.float32))
    assert load_input_file(tmp_path / "ok.npz", ins, "k")["x"].shape == (3, 64)
    with pytest.raises(DataError, match="does not exist"):
        load_input_file(tmp_path / "nope.npy", ins, "k")
    os.mkfifo(tmp_path / "fifo.npy")  # exists, but would block: refused as what it is, not "missing"
    for bad in (tmp_path / "fifo.npy", Path("/dev/zero"), tmp_path):
        with pytest.raises(DataError, match="not a regular file"):
            load_input_file(bad, ins, "k")


def test_mode_table_matches_the_schema_and_says_where_each_mode_applies(mlp, tmp_path):
    import typing

    import torch

    assert set(MODES) | {"auto"} == set(typing.get_args(QuantizeConfig.model_fields["mode"].annotation))
    assert [m for m, row in MODES.items() if row.needs_calibration] == ["static"]
    matmul = onnx.load(str(mlp[0]))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 6, 6),), str(tmp_path / "conv.onnx"), dynamo=False, opset_version=17)
    conv = onnx.load(str(tmp_path / "conv.onnx"))
    for name, row in MODES.items():
        assert row.applies(matmul) is None, name
        weight_only = name.endswith("_weight_only")
        assert (row.applies(conv) is not None) == weight_only, name
        if weight_only:
            assert "MatMul" in row.applies(conv)


def test_explicit_weight_only_on_a_conv_graph_is_not_applicable_and_keeps_the_input(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    src = tmp_path / "conv.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 6, 6),), str(src), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    feeds = {"x": np.random.default_rng(0).standard_normal((16, 1, 6, 6)).astype(np.float32)}
    out = _job(src, tmp_path / "w", feeds, mode="int8_weight_only", force=True).run()
    (c,) = out.candidates
    assert out.chosen is None and c.path is None and not c.applicable
    assert c.reason == "not applicable: no MatMul with constant weights (MatMulNBits needs them)"
    assert c.to_json(None, None)["options"] == {"block_size": 32, "symmetric": True, "accuracy_level": None}


def test_auto_candidates_are_copies_of_the_step_config(mlp, tmp_path):
    src, feeds = mlp
    job = _job(src, tmp_path / "w", feeds, mode="auto", format="qoperator", nodes_to_exclude=["mm2"],
               calibration={"method": "entropy", "samples": 8})
    by = {c.name: c for c in job._plan(onnx.load(str(src)))}
    assert list(by) == ["static qdq per-channel", "static qdq per-tensor", "static qoperator", "dynamic MatMul",
                        "fp16", "int4 weight-only", "int8 weight-only block 128", "int8 weight-only block 32"]
    assert by["static qoperator"].config.format == "qoperator" and by["static qdq per-tensor"].config.format == "qdq"
    assert by["dynamic MatMul"].config.op_types == ["MatMul"] and by["dynamic MatMul"].mode == "dynamic"
    assert by["int8 weight-only block 128"].config.block_size == 128
    assert job.opts.mode == "auto" and job.opts.block_size == 32  # the step's own config is left as it was
    for c in by.values():
        assert isinstance(c.config, QuantizeConfig) and c.excluded_nodes == ["mm2"], c.name
    assert by["static qdq per-tensor"].to_json(None, None)["options"] == {
        "format": "qdq", "per_channel": False, "reduce_range": False, "calibration": "entropy", "samples": 8,
        "op_types": None}
