"""``bench --profile`` on the tiny digits CNN: each runtime's own profiler, read back as a user meets it.

One export writes every target installed here; one ``edgecli bench --profile`` at batch 4 then profiles
the ONNX model and each runtime row. The checks: the profile files are in the bench directory (and its
manifest) and parse with the runtime's own reader; the printed tables name the model's real op types
with shares that add up to at most 100%; each op type is counted once per run and layer (the CNN has
three convolutions and one linear layer), warm-up runs left out; LiteRT says why it has no profile.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import EDGE_TARGETS, Pipeline, cli, copy_of, edge_installed, write_config

BATCH = 4
CONVS = 3  # tiny_config's CNN: channels [16, 32, 32], one linear classifier


@pytest.fixture(scope="module")
def profiled(exported_edge, tmp_path_factory) -> tuple[Pipeline, str, dict]:
    """(the pipeline, the output of `edgecli bench --profile`: tables on stdout then notes on stderr, results.json)."""
    p = copy_of(exported_edge, tmp_path_factory.mktemp("profile") / "pipe")
    p.cfg["bench"] = {**p.cfg["bench"], "batch_sizes": [BATCH], "models": ["export"], "torch_baseline": False}
    write_config(p.config, p.cfg)
    r = cli("bench", "-c", str(p.config), "--profile", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    return p, r.stdout + "\n" + r.stderr, json.loads((p.run_dir / "bench" / "results.json").read_text())


def _printed(out: str, model: str) -> list[list[str]]:
    """The rows of the printed table titled ``profile: <model> · ...``: [op, share, total ms, ms/run, calls]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"profile: {model} ·"))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("+") or "-+-" in line:  # the plain (ASCII) box's rules
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else \
            re.split(r"\s{2,}", line.strip())
        if rows and len(cells) != 5:
            break
        if len(cells) == 5 and cells[1].endswith("%"):
            rows.append(cells)
    return rows


def _profile(results: dict, model: str) -> dict:
    return next(p for p in results["profiles"] if p["model"] == model)


def test_every_model_benched_gets_a_profile_record(profiled):
    _, _, res = profiled
    want = {"export"} | {f"export {t}:fp32" for t in EDGE_TARGETS if edge_installed(t)}
    assert {p["model"] for p in res["profiles"]} == want
    # the timed rows are measured as without --profile: the profile runs are workers of their own
    assert {r["model"] for r in res["rows"]} == want and all(r["runs"] >= 30 for r in res["rows"])


def test_onnxruntime_profile_is_a_chrome_trace_of_the_model_ops(profiled):
    p, out, res = profiled
    prof = _profile(res, "export")
    path = p.run_dir / "bench" / "profile-export.json"
    assert prof["file"] == path.name and path.name in p.manifest("bench")["outputs"]
    events = json.loads(path.read_text())
    assert {e["args"]["op_name"] for e in events if e.get("cat") == "Node"} >= {"Conv", "Gemm"}
    ops = {o["op"]: o for o in prof["ops"]}
    runs = prof["runs"]
    assert runs == 30 and prof["batch"] == BATCH
    assert ops["Conv"]["calls"] == CONVS * runs and ops["Gemm"]["calls"] == runs  # warm-up runs left out
    printed = _printed(out, "export")
    assert {r[0] for r in printed} >= {"Conv", "Gemm"}
    assert sum(float(r[1].rstrip("%")) for r in printed) <= 100 + 0.05 * len(printed)  # each rounded to 0.1
    assert abs(sum(o["share"] for o in prof["ops"]) - 1) < 1e-9


@pytest.mark.skipif(not edge_installed("openvino"), reason="the openvino extra is not installed")
def test_openvino_profile_is_its_performance_counters(profiled):
    p, out, res = profiled
    prof = _profile(res, "export openvino:fp32")
    data = json.loads((p.run_dir / "bench" / "profile-export-openvino-fp32.json").read_text())
    assert data["source"] == "get_profiling_info" and data["runs"] == prof["runs"]
    executed = [r for r in data["records"] if r["status"] == "EXECUTED"]
    assert {r["node_type"] for r in executed} >= {"Convolution", "FullyConnected"}
    ops = {o["op"]: o for o in prof["ops"]}
    assert ops["Convolution"]["calls"] == CONVS * prof["runs"] and ops["FullyConnected"]["calls"] == prof["runs"]
    printed = _printed(out, "export openvino:fp32")
    assert {r[0] for r in printed} >= {"Convolution", "FullyConnected"}
    assert sum(float(r[1].rstrip("%")) for r in printed) <= 100 + 0.05 * len(printed)  # each rounded to 0.1


@pytest.mark.skipif(not edge_installed("pte"), reason="the executorch extra is not installed")
def test_executorch_profile_is_an_etdump_or_says_why_not(profiled):
    p, out, res = profiled
    prof = _profile(res, "export pte:fp32")
    if prof.get("unavailable"):  # a runtime built without the event tracer: the row says so
        assert prof["unavailable"].startswith("not available in this executorch build: ")
        assert f"export pte:fp32 (executorch): profile: {prof['unavailable']}" in " ".join(out.split())
        return
    from edgecli.runtimes.profile import etdump_ops

    path = p.run_dir / "bench" / "profile-export-pte-fp32.etdp"
    assert prof["file"] == path.name and path.name in p.manifest("bench")["outputs"]
    ops, runs = etdump_ops(path, 0, prof["runs"])  # read back with executorch.devtools.Inspector
    assert runs == prof["runs"] and ops
    # the .pte is exported at batch 1: a batch of 4 is four executions per run, each through every kernel
    mine = {o["op"]: o for o in prof["ops"]}
    conv = next(k for k in mine if k.startswith("Convolution"))
    linear = next(k for k in mine if k.startswith("Fully Connected"))
    assert mine[conv]["calls"] == CONVS * BATCH * prof["runs"] and mine[linear]["calls"] == BATCH * prof["runs"]
    printed = _printed(out, "export pte:fp32")
    assert any(r[0].startswith("Convolution") for r in printed)
    assert sum(float(r[1].rstrip("%")) for r in printed) <= 100 + 0.05 * len(printed)  # each rounded to 0.1


@pytest.mark.skipif(not edge_installed("tflite"), reason="the litert extra is not installed")
def test_litert_row_says_why_it_has_no_profile(profiled):
    p, out, res = profiled
    prof = _profile(res, "export tflite:fp32")
    assert "no op profiler" in prof["unavailable"] and "file" not in prof
    assert f"export tflite:fp32 (litert): profile: {prof['unavailable']}" in " ".join(out.split())
    assert not list((p.run_dir / "bench").glob("profile-export-tflite*"))


def test_profile_flag_is_the_bench_profile_setting(trained_cnn, tmp_path):
    p = copy_of(trained_cnn, tmp_path / "pipe")
    r = cli("bench", "-c", str(p.config), "--profile", "--dry-run", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+profile: true$", r.stdout, re.M), r.stdout
    r = cli("bench", "-c", str(p.config), "--dry-run", cwd=p.dir)
    assert re.search(r"^\s+profile: false$", r.stdout, re.M), r.stdout
