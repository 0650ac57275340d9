"""The bench stage through the typer app in process (each model still in its own worker process): table == results.json == results.md, budgets, baselines, providers."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from edgecli.budgets import compare_baseline
from edgecli.report import pareto_front
from edgecli.runtimes.worker import latency_stats
from tests.conftest import Pipeline, cli, write_config

EASY = {"accuracy_min": 0.5, "latency_p95_ms": 10000.0, "latency_p50_ms": 10000.0, "size_kb": 100000.0,
        "max_accuracy_drop": 0.5, "peak_memory_mb": 100000.0}


def _with_bench(p: Pipeline, **bench) -> Pipeline:
    cfg = dict(p.cfg)
    cfg["bench"] = {**p.cfg["bench"], **bench}
    write_config(p.config, cfg)
    return Pipeline(p.dir, p.config, cfg)


@pytest.fixture(scope="module")
def benched(trained_cnn, tmp_path_factory):
    """train + a copy of its model.onnx given by path, benched with easy budgets, 2 processes each (about 10 s)."""
    d = tmp_path_factory.mktemp("benched")
    shutil.copytree(trained_cnn.dir, d / "pipe")
    other = d / "elsewhere" / "model.onnx"
    other.parent.mkdir()
    shutil.copy(trained_cnn.run_dir / "train" / "model.onnx", other)
    cfg = dict(trained_cnn.cfg, artifacts_dir=str(d / "pipe" / "artifacts"))
    cfg["bench"] = {**cfg["bench"], "models": ["train", str(other)], "batch_sizes": [1, 4], "repeats": 2,
                    "budgets": {**EASY, "model": "train"}}
    p = Pipeline(d / "pipe", write_config(d / "pipe" / "config.yaml", cfg), cfg)
    summary = d / "summary.md"
    r = cli("bench", "-c", str(p.config), cwd=p.dir, env={"GITHUB_STEP_SUMMARY": str(summary)})
    return p, r, summary


def _numbers(cells: list[str]) -> dict:
    """The numeric cells of one table row: model batch threads size accuracy p50 p95 p99 samples/s peak MB speed-up."""
    size, unit = cells[3].split()
    return {
        "model": cells[0], "batch": int(cells[1]), "threads": int(cells[2]),
        "size_kb": float(size) * (1024 if unit == "MB" else 1), "accuracy": float(cells[4]),
        "p50_ms": float(cells[5]), "p95_ms": float(cells[6]), "p99_ms": float(cells[7]),
        "throughput_sps": float(cells[8].replace(",", "")), "peak_memory_mb": float(cells[9]),
        "speedup": float(cells[10].rstrip("x")),
    }


def _close(shown: float, value: float) -> bool:
    """Equal up to the rounding of a 3-4 decimal display."""
    return abs(shown - value) <= 6e-4 + 1e-3 * abs(value)


def _check_row(shown: dict, row: dict) -> None:
    assert _close(shown["size_kb"], row["size_bytes"] / 1024)
    assert shown["accuracy"] == pytest.approx(row["accuracy"], abs=6e-5)
    for k in ("p50_ms", "p95_ms", "p99_ms"):
        assert _close(shown[k], row[k]), (k, shown[k], row[k])
    assert abs(shown["throughput_sps"] - row["throughput_sps"]) <= 0.51
    assert shown["peak_memory_mb"] == pytest.approx(row["peak_memory_mb"], abs=0.051)
    assert shown["speedup"] == pytest.approx(row["speedup_vs_pytorch"], abs=0.0051)


def test_table_results_json_and_markdown_hold_the_same_numbers(benched):
    p, r, summary = benched
    assert r.returncode == 0, r.stderr
    out = p.run_dir / "bench"
    assert {"results.json", "results.md", "pareto.png", "manifest.json"} <= {f.name for f in out.iterdir()}
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    # pytorch baseline + train + the copy given by path ("model"), at both batch sizes
    assert sorted((r_["model"], r_["batch"]) for r_ in rows) == sorted(
        (m, b) for m in ("pytorch", "train", "model") for b in (1, 4))

    table = {}
    for line in r.stdout.splitlines():
        cells = [c for c in re.split(r"\s{2,}|\s*\|\s*", line.strip()) if c]
        if len(cells) == 11 and cells[0] in ("pytorch", "train", "model") and cells[1].isdigit():
            table[(cells[0], int(cells[1]))] = _numbers(cells)
    md = {}
    for line in (out / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[1].isdigit():
            md[(cells[0], int(cells[1]))] = _numbers(cells)
    assert set(table) == set(md) == {(r_["model"], r_["batch"]) for r_ in rows}
    for row in rows:
        _check_row(table[(row["model"], row["batch"])], row)
        _check_row(md[(row["model"], row["batch"])], row)
    assert summary.read_text() == (out / "results.md").read_text() + "\n"

    from PIL import Image

    with Image.open(out / "pareto.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        assert len(set(im.convert("RGB").getdata())) > 50  # a plot, not a blank canvas


def test_raw_latencies_accuracy_and_clean_workers(benched, trained_cnn):
    p, r, _ = benched
    res = json.loads((p.run_dir / "bench" / "results.json").read_text())
    train_acc = trained_cnn.manifest("train")["metrics"]["test_accuracy"]
    for row in res["rows"]:
        lat = np.asarray(row["latencies_ns"], dtype=np.float64) / 1e6
        assert len(lat) == 2 * 30  # runs: 30, no min_time_s, in each of 2 fresh processes, pooled
        per = row["p50_per_process_ms"]
        assert len(per) == 2
        assert per[0] == pytest.approx(np.percentile(lat[:30], 50)) and per[1] == pytest.approx(np.percentile(lat[30:], 50))
        assert row["p50_ms"] == pytest.approx(np.percentile(lat, 50))
        assert row["p95_ms"] == pytest.approx(np.percentile(lat, 95))
        assert row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["throughput_sps"] == pytest.approx(row["batch"] * 1e3 / lat.mean())
        # same test split, same weights: every path scores what train measured
        assert row["accuracy"] == pytest.approx(train_acc, abs=1e-9)
        base = next(b for b in res["rows"] if b["model"] == "pytorch" and b["batch"] == row["batch"])
        assert row["speedup_vs_pytorch"] == pytest.approx(base["p50_ms"] / row["p50_ms"])
    ms = {m["model"]: m for m in res["measurements"]}
    assert all(m["processes"] == 2 for m in ms.values())
    assert ms["pytorch"]["torch_imported"] is True
    for name in ("train", "model"):
        m = ms[name]
        assert m["torch_imported"] is False  # ONNX workers stay torch-free: clean memory figures
        assert m["load_ms"] > 0 and m["first_inference_ms"] > 0 and m["cold_start_ms"] > m["load_ms"]
        assert 5 < m["peak_memory_mb"] < ms["pytorch"]["peak_memory_mb"]
        cm = np.array(m["metrics"]["confusion_matrix"])
        assert cm.sum() == 359 and m["metrics"]["accuracy"] == pytest.approx(np.trace(cm) / 359)
    sizes = {mm["label"]: mm["size_bytes"] for mm in res["models"]}
    assert sizes["train"] == sizes["model"] == (trained_cnn.run_dir / "train" / "model.onnx").stat().st_size
    env = res["environment"]
    assert env["logical_cpus"] >= 1 and env["cpu_model"] and set(env["isa"]) >= {"avx2", "avx512", "vnni", "amx"}
    assert env["versions"]["onnxruntime"] and env["versions"]["torch"]
    # easy budgets, all met, on the model named in budgets.model
    assert res["budget_model"] == "train" and res["budgets"] and all(b["ok"] for b in res["budgets"])
    assert {b["budget"] for b in res["budgets"]} == set(EASY)
    assert "budgets (train)" in r.stdout


def test_impossible_budget_exits_1_names_it_and_still_publishes(benched, copy_pipeline):
    p0, _, _ = benched
    p = _with_bench(copy_pipeline(p0), models=["train"], torch_baseline=False, batch_sizes=[1],
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                    budgets={"latency_p95_ms": 1e-6, "accuracy_min": 0.5})
    assert (p.run_dir / "bench" / "results.json").is_file()  # copied from the earlier run, same inputs
    r = cli("bench", "-c", str(p.config), "--json")
    assert r.returncode == 1, r.stderr
    fail = [line for line in r.stderr.splitlines() if line.startswith("check failed:")]
    assert len(fail) == 1
    assert "latency_p95_ms" in fail[0] and "limit 1e-06 ms" in fail[0]
    measured = json.loads((p.run_dir / "bench" / "results.json").read_text())["rows"][0]["p95_ms"]
    assert f"measured {measured:.4f} ms" in fail[0]
    assert "accuracy_min" not in fail[0]  # the budget that holds is not blamed
    assert "CUDAExecutionProvider skipped" in r.stderr  # absent provider: reported, not a crash
    js = json.loads(r.stdout)
    assert js["exit_code"] == 1 and js["status"] == "done"  # measured again, never "up to date"
    assert js["details"]["skipped"] == [{"provider": "CUDAExecutionProvider", "reason": "not available in this onnxruntime build"}]
    assert [m["label"] for m in js["details"]["models"]] == ["train"]


def test_baseline_regression_fails_and_bad_baseline_is_a_usage_error(benched, copy_pipeline, tmp_path):
    p0, _, _ = benched
    p = _with_bench(copy_pipeline(p0), models=["train"], torch_baseline=False, batch_sizes=[1],
                    budgets={"max_regression": 0.5})
    old = json.loads((p0.run_dir / "bench" / "results.json").read_text())
    for row in old["rows"]:
        row["p95_ms"] /= 100  # an earlier run 100x faster: today's must read as a regression
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(old))
    r = cli("bench", "-c", str(p.config), "--baseline", str(fast), "-q")
    assert r.returncode == 1, r.stderr
    assert "p95 regression of train (batch 1, 1 thread(s))" in r.stderr and "> +50%" in r.stderr
    reg = json.loads((p.run_dir / "bench" / "results.json").read_text())["regression"]
    assert reg["checked_rows"] == 1 and not reg["ok"] and reg["rows"][0]["change"] > 10

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = cli("bench", "-c", str(p.config), "--baseline", str(bad))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("usage error: --baseline")
    r = cli("bench", "-c", str(p.config), "--baseline", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_foreign_onnx_model_fixed_batch_and_synthetic_inputs(trained_cnn, copy_pipeline, tmp_path):
    """A model the test split does not fit is still timed (synthetic inputs); a fixed batch skips other sizes."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [5, 3], np.arange(15, dtype=np.float32).tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    p = _with_bench(copy_pipeline(trained_cnn), models=[str(path)], torch_baseline=False, batch_sizes=[1, 4],
                    budgets={"accuracy_min": 0.5})
    r = cli("bench", "-c", str(p.config))
    assert r.returncode == 1  # accuracy cannot be measured, so accuracy_min cannot hold
    assert "accuracy_min broken by foreign" in r.stderr and "not measured" in r.stderr
    assert "batch 4 skipped (model has a fixed batch size of 1)" in r.stderr
    assert "synthetic inputs" in r.stderr
    res = json.loads((p.run_dir / "bench" / "results.json").read_text())
    assert [(x["model"], x["batch"], x["accuracy"]) for x in res["rows"]] == [("foreign", 1, None)]


def test_user_errors_are_one_line_exit_2(trained_cnn, copy_pipeline, tmp_path):
    p = _with_bench(copy_pipeline(trained_cnn), torch_baseline=False, budgets={"model": "trian"})
    r = cli("bench", "-c", str(p.config))
    assert r.returncode == 2 and "bench.budgets.model: 'trian'" in r.stderr and "did you mean 'train'" in r.stderr
    r = cli("bench", "-c", str(p.config), "--set", "bench.budgets.model=null", "--set", "bench.models=[compress]")
    assert r.returncode == 2 and "compress" in r.stderr and "Traceback" not in r.stderr
    notonnx = tmp_path / "x.onnx"
    notonnx.write_bytes(b"hello, not a model")
    r = cli("bench", "-c", str(p.config), "--set", "bench.budgets.model=null", "--set", f"bench.models=[{notonnx}]")
    assert r.returncode == 2 and "not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr
    empty = write_config(tmp_path / "empty.yaml", dict(p.cfg, artifacts_dir=str(tmp_path / "nothing")))
    r = cli("bench", "-c", str(empty))
    assert r.returncode == 2 and "none of train, compress, export has been run" in r.stderr


def test_latency_stats_and_pareto_front_by_hand():
    s = latency_stats([1_000_000, 2_000_000, 3_000_000, 4_000_000], batch=2)
    assert s["p50_ms"] == 2.5 and s["mean_ms"] == 2.5 and s["min_ms"] == 1 and s["max_ms"] == 4
    assert s["throughput_sps"] == pytest.approx(2 * 4 / 0.010)  # 8 samples in 10 ms
    pts = [{"p50_ms": 1.0, "accuracy": 0.90}, {"p50_ms": 2.0, "accuracy": 0.95}, {"p50_ms": 3.0, "accuracy": 0.93},
           {"p50_ms": 0.5, "accuracy": 0.80}, {"p50_ms": 2.0, "accuracy": 0.97}]
    assert sorted(pareto_front(pts)) == [0, 3, 4]
    rows = [{"model": "m", "provider": "CPU", "batch": 1, "threads": 1, "p95_ms": 1.05},
            {"model": "o", "provider": "CPU", "batch": 1, "threads": 1, "p95_ms": 5.0}]
    base = {"rows": [{"model": "m", "provider": "CPU", "batch": 1, "threads": 1, "p95_ms": 1.0},
                     {"model": "o", "provider": "CPU", "batch": 1, "threads": 1, "p95_ms": 1.0}]}
    ok = compare_baseline(rows, base, "m", 0.10)
    assert ok["ok"] and ok["checked_rows"] == 1  # +5% on the target; 'o' regressed but is not the target
    assert not compare_baseline(rows, base, "m", 0.01)["ok"]
    # +15% pooled, but one of this run's own processes measured p95 0.95 ms <= the baseline's 1.0 ms:
    # within what two processes of one model differ by here, not a slower model
    noisy = [{**rows[0], "p95_ms": 1.15, "p95_per_process_ms": [0.95, 1.30]}]
    c = compare_baseline(noisy, base, "m", 0.10)
    assert c["ok"] and c["rows"][0]["within_noise"] and c["rows"][0]["p95_process_range_ms"] == [0.95, 1.30]
    # every process slower than the baseline: a regression, however wide the spread
    slow = [{**rows[0], "p95_ms": 1.15, "p95_per_process_ms": [1.05, 1.30]}]
    c = compare_baseline(slow, base, "m", 0.10)
    assert not c["ok"] and not c["rows"][0]["within_noise"]
    # one process (bench.repeats 1) has no spread to judge by: the threshold alone decides
    assert not compare_baseline([{**rows[0], "p95_ms": 1.15, "p95_per_process_ms": [0.9]}], base, "m", 0.10)["ok"]


def test_baseline_of_another_pipeline_is_refused(trained_cnn, copy_pipeline, tmp_path):
    p = copy_pipeline(trained_cnn)
    r = cli("bench", "-c", str(p.config), "-q", "--set", "bench.torch_baseline=false", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    other = json.loads((p.run_dir / "bench/results.json").read_text())
    other["pipeline"] = "some-other-pipeline"
    base = tmp_path / "other.json"
    base.write_text(json.dumps(other))
    r = cli("bench", "-c", str(p.config), "-q", "--baseline", str(base), cwd=p.dir)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"usage error: --baseline {base}: results of pipeline 'some-other-pipeline', not '{p.cfg['name']}'; "
        "compare runs of the same pipeline"]
