"""The edge runtimes beside ONNX Runtime (LiteRT, ExecuTorch, OpenVINO) on the tiny digits CNN.

One export writes every target (model.onnx, model.ort, model.tflite, model.pte, model.xml/.bin); each is
then checked as a user would meet it: its card.json record, infer on 200 PNGs through that runtime
(``--runtime`` and by the file's extension) against ONNX Runtime's top-1, its bench row, and a runtime
that is not installed (made absent for real in a child interpreter) as one line naming the extra, exit 2.
INT8 targets and ``auto`` are slower: marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLI_ENV, REPO, Pipeline, cli, copy_of, edge_installed, edgecli, write_config
from tests.conftest import EDGE_TARGETS as EDGE

# target -> (runtime, file, pip distribution that carries the runtime's version, extra)
TARGETS = {
    "onnx": ("onnxruntime", "model.onnx", "onnxruntime", None),
    "ort": ("onnxruntime", "model.ort", "onnxruntime", None),
    "tflite": ("litert", "model.tflite", "ai-edge-litert", "litert"),
    "pte": ("executorch", "model.pte", "executorch", "executorch"),
    "openvino": ("openvino", "model.xml", "openvino", "openvino"),
}


needs = {t: pytest.mark.skipif(not edge_installed(t), reason=f"the {TARGETS[t][3]} extra is not installed "
                               f"(make install installs it)") for t in EDGE}
edge_params = [pytest.param(t, marks=needs[t]) for t in EDGE]


@pytest.fixture(scope="module")
def pipe(exported_edge, tmp_path_factory) -> Pipeline:
    """The session CNN exported to every target installed here, plus 200 test-split digits as PNGs."""
    p = copy_of(exported_edge, tmp_path_factory.mktemp("runtimes") / "pipe")
    spec = importlib.util.spec_from_file_location("sample_digits", REPO / "scripts" / "sample_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["-c", str(p.config), "--out", str(p.dir / "samples"), "-n", "200"]) == 0
    return p


def _pngs(p: Pipeline) -> list[str]:
    return sorted(str(f) for f in (p.dir / "samples").glob("*.png"))


def _card(p: Pipeline) -> dict:
    return json.loads((p.run_dir / "export" / "card.json").read_text())


def _infer(p: Pipeline, *args: str) -> list[dict]:
    files = _pngs(p)
    assert len(files) == 200
    r = cli("infer", "-c", str(p.config), "--json", "-q", *args, *files, cwd=p.dir)
    assert r.returncode == 0, r.stderr
    res = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert [o["input"] for o in res] == files
    return res


@pytest.fixture(scope="module")
def ort_top1(pipe) -> np.ndarray:
    res = _infer(pipe, "--runtime", "onnxruntime")
    assert {o["model_sha256"] for o in res} == {_card(pipe)["targets"][0]["files"]["model.onnx"]["sha256"]}
    return np.array([o["top_k"][0]["index"] for o in res])


@pytest.mark.parametrize("target", ["onnx", "ort", *edge_params])
def test_card_lists_the_target_with_its_file_runtime_and_parity(pipe, target):
    from edgecli.artifacts import sha256_file

    runtime, fname, dist, _ = TARGETS[target]
    recs = [t for t in _card(pipe)["targets"] if t["target"] == target]
    assert len(recs) == 1, _card(pipe)["targets"]
    rec = recs[0]
    assert rec["file"] == fname and rec["runtime"] == runtime and rec["version"] == version(dist)
    assert rec["precision"] == "fp32"
    export = pipe.run_dir / "export"
    want_files = {fname, "model.bin"} if target == "openvino" else {fname}  # an IR is .xml + .bin
    assert set(rec["files"]) == want_files
    for name, f in rec["files"].items():
        assert f["sha256"] == sha256_file(export / name) and f["bytes"] == (export / name).stat().st_size
    assert rec["bytes"] == sum(f["bytes"] for f in rec["files"].values())
    par = rec["parity"]
    # checked against the float model on the test split: fp32 means the same answers, to atol
    assert par["passed"] and par["samples"] >= 200 and par["top1_agreement"] == 1.0
    assert par["max_abs_diff"] <= 1e-4


# by extension, a file path is probed in a child first (a malformed file must not abort edgecli): for a
# .pte that child imports torch and torchao for ExecuTorch, about 7 s of CPU, so that case is slow
@pytest.mark.parametrize("target, how", [
    *[pytest.param(t, "--runtime", marks=needs[t]) for t in EDGE],
    pytest.param("tflite", "extension", marks=needs["tflite"]),
    pytest.param("openvino", "extension", marks=needs["openvino"]),
    pytest.param("pte", "extension", marks=[needs["pte"], pytest.mark.slow]),
])
def test_infer_on_200_pngs_agrees_with_onnxruntime(pipe, ort_top1, target, how):
    runtime, fname, _, _ = TARGETS[target]
    export = pipe.run_dir / "export"
    args = ("--runtime", runtime) if how == "--runtime" else ("--set", f"infer.input={export / fname}")
    res = _infer(pipe, *args)
    rec = next(t for t in _card(pipe)["targets"] if t["target"] == target)
    assert {o["model_sha256"] for o in res} == {rec["files"][fname]["sha256"]}  # that file answered
    got = np.array([o["top_k"][0]["index"] for o in res])
    assert np.mean(got == ort_top1) >= 0.99, f"{int((got != ort_top1).sum())} of 200 differ from ONNX Runtime"
    for o in res:
        probs = [t["prob"] for t in o["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_bench_gives_each_runtime_its_row(pipe, tmp_path):
    p = copy_of(pipe, tmp_path / "pipe")
    r = cli("bench", "-c", str(p.config), "-q", "--set", "bench.torch_baseline=false", "--set", "bench.models=[export]",
            cwd=p.dir)
    assert r.returncode == 0, r.stderr
    res = json.loads((p.run_dir / "bench" / "results.json").read_text())
    rows = {row["model"]: row for row in res["rows"]}
    onnx = rows.pop("export")
    card = {t["target"]: t for t in _card(p)["targets"]}
    want = {f"export {t}:fp32" for t in EDGE if edge_installed(t)}
    assert set(rows) == want, list(rows)
    for label, row in rows.items():
        target = label.split()[1].split(":")[0]
        runtime, fname, dist, _ = TARGETS[target]
        assert row["provider"] == f"{runtime} fp32" and Path(row["path"]).name == fname
        assert row["size_bytes"] == card[target]["bytes"] and row["p50_ms"] > 0
        # test-split accuracy measured through that runtime: the fp32 file gives ONNX Runtime's answers
        assert abs(row["accuracy"] - onnx["accuracy"]) <= 0.01, (label, row["accuracy"], onnx["accuracy"])
        assert res["environment"]["versions"][dist] == version(dist)


@pytest.mark.parametrize("wanted", [["litert"], ["openvino", "onnxruntime"], ["onnxruntime"]])
def test_bench_runtimes_names_the_targets_that_get_a_row(pipe, wanted):
    from edgecli.runtimes.targets import bench_entries

    for name in wanted:
        if name != "onnxruntime" and not edge_installed(next(t for t in EDGE if TARGETS[t][0] == name)):
            pytest.skip(f"{name} is not installed")
    entries, notes = bench_entries(pipe.run_dir / "export", wanted)
    assert [e["runtime"] for e in entries] == [w for w in wanted if w != "onnxruntime"] and notes == []
    assert all(e["path"].parent == pipe.run_dir / "export" and e["path"].is_file() for e in entries)


# A child interpreter in which the named packages are absent: a finder first on sys.meta_path answers
# "no module named ..." for them, as an interpreter without the wheel would (sitecustomize runs at start).
_ABSENT = '''import os, sys
_GONE = {m for m in os.environ.get("EDGECLI_TEST_ABSENT", "").split(",") if m}
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _GONE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
'''
# The commands, each run as `edgecli ...` through the CLI's own funnel in that child; their exit codes and stderr
_CHILD = '''import json, sys
from tests.conftest import cli
out = []
for args in json.loads(sys.argv[1]):
    r = cli(*args, unexpected="report")
    out.append([r.returncode, r.stderr])
print(json.dumps(out))
'''


def _child(p: Pipeline, commands: list[list[str]], pythonpath: list[Path], env: dict) -> list[tuple[int, str]]:
    import os

    full = {**os.environ, **CLI_ENV, **env,
            "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(REPO), os.environ.get("PYTHONPATH", "")])}
    full.pop("EDGECLI_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(commands)], cwd=p.dir, capture_output=True,
                          text=True, env=full, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]


def _commands(p: Pipeline, target: str) -> list[list[str]]:
    runtime, fname, _, _ = TARGETS[target]
    c, png = str(p.config), _pngs(p)[0]
    return [
        ["infer", "-c", c, "--runtime", runtime, png],
        ["infer", "-c", c, "--set", f"infer.input={p.run_dir / 'export' / fname}", png],
        ["export", "-c", c, "-q", "--force", "--set", f"export.targets=[onnx,{target}]"],
        ["bench", "-c", c, "-q", "--set", "bench.torch_baseline=false", "--set", f"bench.runtimes=[{runtime}]"],
    ]


def _one_line_naming(rc: int, err: str, what: str, extra: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, (what, rc, err)
    assert f"pip install -e '.[{extra}]'" in lines[0] and lines[0].startswith(("config error:", "model error:")), (what, err)


def test_a_runtime_that_is_not_installed_is_one_line_naming_its_extra(pipe, tmp_path):
    p = copy_of(pipe, tmp_path / "pipe")
    before = (p.run_dir / "export" / "card.json").read_bytes()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_ABSENT)
    absent = {"tflite": "ai_edge_litert,litert_torch", "pte": "executorch", "openvino": "openvino,nncf"}
    for target in EDGE:
        runtime, _, _, extra = TARGETS[target]
        results = _child(p, _commands(p, target), [site], {"EDGECLI_TEST_ABSENT": absent[target]})
        for (rc, err), cmd in zip(results, _commands(p, target), strict=True):
            _one_line_naming(rc, err, " ".join(cmd[:1] + cmd[3:]), extra)
            assert "not installed" in err and f"runtime {runtime}" in err, err
    # nothing half-written: the published export is the one from before
    assert (p.run_dir / "export" / "card.json").read_bytes() == before


# export (the third command) converts the ONNX model before the converter's import fails: slow
@pytest.mark.parametrize("target, commands", [
    *[pytest.param(t, slice(0, 2), marks=needs[t], id=f"{t}-infer") for t in EDGE],
    pytest.param("tflite", slice(2, 3), marks=[needs["tflite"], pytest.mark.slow], id="tflite-export"),
    pytest.param("openvino", slice(3, 4), marks=needs["openvino"], id="openvino-bench"),
])
def test_a_runtime_installed_but_broken_is_one_line_naming_its_extra(pipe, tmp_path, target, commands):
    """A package that is there but does not import (a wheel whose shared library is missing)."""
    p = copy_of(pipe, tmp_path / "pipe")
    runtime, _, _, extra = TARGETS[target]
    shadow = tmp_path / "shadow"
    pkg = {"tflite": "ai_edge_litert", "pte": "executorch", "openvino": "openvino"}[target]
    (shadow / pkg).mkdir(parents=True)
    (shadow / pkg / "__init__.py").write_text('raise ImportError("libruntime.so: cannot open shared object file")\n')
    cmds = _commands(p, target)[commands]
    for (rc, err), cmd in zip(_child(p, cmds, [shadow], {}), cmds, strict=True):
        _one_line_naming(rc, err, " ".join(cmd[:1] + cmd[3:]), extra)
        assert "libruntime.so" in err and f"runtime {runtime}" in err, err
        if cmd[0] == "bench":  # the worker's import failed: a config error as infer's, not a model error
            assert err.startswith("config error: runtime"), err


def test_a_hostile_card_target_is_refused(pipe, tmp_path):
    """card.json naming a target file outside the bundle: infer --runtime refuses it, exit 2, opens nothing."""
    p = copy_of(pipe, tmp_path / "pipe")
    export = p.run_dir / "export"
    victim = p.run_dir / "victim.tflite"
    victim.write_bytes((export / "model.tflite").read_bytes() if (export / "model.tflite").exists() else b"x" * 64)
    card = json.loads((export / "card.json").read_text())
    for name in ("../victim.tflite", str(victim)):
        card["targets"] = [t for t in card["targets"] if t["runtime"] != "litert"] + [
            {"target": "tflite", "file": name, "runtime": "litert", "version": "2.3.0", "precision": "fp32",
             "files": {}, "bytes": 64, "parity": {}}]
        (export / "card.json").write_text(json.dumps(card))
        r = cli("infer", "-c", str(p.config), "--runtime", "litert", "--json", _pngs(p)[0], cwd=p.dir)
        assert r.returncode == 2 and r.stdout == "", (name, r.returncode, r.stdout, r.stderr)
        assert "not a plain file name" in r.stderr or "card.json does not match its manifest" in r.stderr, r.stderr


@needs["openvino"]
def test_a_random_bytes_openvino_model_is_one_model_error_line(pipe, tmp_path):
    """OpenVINO's frontends echo the file's bytes to the probe child's stderr: bytes that are not UTF-8 were an
    unexpected UnicodeDecodeError (exit 1); OpenVINO's message is given without its "Exception from" lines."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in ("card.json", "model.bin"):
        (bundle / f).write_bytes((pipe.run_dir / "export" / f).read_bytes())
    (bundle / "model.xml").write_bytes(np.random.default_rng(1).bytes(5000))
    r = edgecli("infer", "-c", str(pipe.config), "--set", f"infer.input={bundle / 'model.xml'}", _pngs(pipe)[0],
                cwd=pipe.dir)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("model error:"), r.stderr
    assert "Unable to read the model" in lines[0], lines[0]


@pytest.mark.parametrize("target", edge_params)
def test_infer_stderr_holds_edgecli_lines_only_unless_verbose(pipe, target):
    """(A real child process: the chatter is written to fd 2, past Python's sys.stderr.) The runtimes' own chatter (ExecuTorch's cpuinfo/threadpool lines, torchao's failed .so loads, LiteRT's
    "INFO: Created TensorFlow Lite XNNPACK delegate") stays off stderr; -v shows library logs."""
    runtime = TARGETS[target][0]
    r = edgecli("infer", "-c", str(pipe.config), "--runtime", runtime, _pngs(pipe)[0], cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("infer: ") for ln in lines), r.stderr
    if target == "tflite":
        r = edgecli("infer", "-c", str(pipe.config), "--runtime", runtime, "-v", _pngs(pipe)[0], cwd=pipe.dir)
        assert r.returncode == 0 and "XNNPACK delegate" in r.stderr, r.stderr


@pytest.mark.parametrize("target", edge_params)
def test_bench_and_infer_refuse_a_target_file_or_card_changed_after_export(pipe, tmp_path, target):
    """A swapped target file would be measured (or answered) as the export's: bench and infer --runtime check
    the card and each file it names against the export manifest first (exit 2, one line, no bench stage)."""
    p = copy_of(pipe, tmp_path / "pipe")
    export = p.run_dir / "export"
    fname = TARGETS[target][1]
    original = (export / fname).read_bytes()
    (export / fname).write_bytes(original[: len(original) // 2])
    args = ("bench", "-c", str(p.config), "-q", "--set", "bench.torch_baseline=false", "--set", "bench.models=[export]")
    r = cli(*args, cwd=p.dir)
    assert r.returncode == 2 and f"{fname} does not match its manifest" in r.stderr, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and not (p.run_dir / "bench").exists()
    r = cli("infer", "-c", str(p.config), "--runtime", TARGETS[target][0], "--json", _pngs(p)[0], cwd=p.dir)
    assert r.returncode == 2 and r.stdout == "" and f"{fname} does not match its manifest" in r.stderr, r.stderr
    (export / fname).write_bytes(original)
    card = json.loads((export / "card.json").read_text())
    next(t for t in card["targets"] if t["target"] == target)["file"] = "../victim" + Path(fname).suffix
    (export / "card.json").write_text(json.dumps(card))
    r = cli(*args, cwd=p.dir)
    assert r.returncode == 2 and "card.json does not match its manifest" in r.stderr, (r.returncode, r.stderr)
    assert not (p.run_dir / "bench").exists()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tflite:int8", "pte:int8", "openvino:int8-weights", "openvino:int8"])
def test_int8_targets_hold_the_accuracy_gate_and_infer(pipe, ort_top1, tmp_path, target):
    name, _, prec = target.partition(":")
    if not edge_installed(name):
        pytest.skip(f"the {TARGETS[name][3]} extra is not installed")
    p = copy_of(pipe, tmp_path / "pipe")
    r = cli("export", "-c", str(p.config), "-q", "--set", f"export.targets=[onnx,{target}]", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    rec = next(t for t in _card(p)["targets"] if t["target"] == name)
    assert rec["precision"] == prec and rec["parity"]["passed"] and rec["parity"]["accuracy_drop"] <= 0.01
    assert rec["bytes"] < next(t for t in _card(p)["targets"] if t["target"] == "onnx")["bytes"]
    got = np.array([o["top_k"][0]["index"] for o in _infer(p, "--runtime", TARGETS[name][0])])
    assert np.mean(got == ort_top1) >= 0.97


@pytest.mark.slow
def test_auto_publishes_a_measured_choice(pipe, tmp_path):
    p = copy_of(pipe, tmp_path / "pipe")
    r = cli("export", "-c", str(p.config), "-q", "--set", "export.targets=auto", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    card = _card(p)
    auto = card["auto"]
    assert auto["rows"] and auto["chosen"]
    assert all("why" in row for row in auto["rows"])
    extra = [t for t in card["targets"] if t["target"] not in ("onnx", "ort")]
    assert len(extra) <= 1 and all(f"{t['target']}:{t['precision']}" == auto["chosen"] for t in extra)


def test_auto_without_the_extras_keeps_onnxruntime_never_slower_than_fp32(pipe, tmp_path):
    """`auto` where no other runtime is installed: no crash; each runtime listed as not tried with its
    extra; a quantized export input is timed beside the float model it came from, and the choice is the
    faster of the two (the float one published as model-fp32.onnx, byte for byte the train model)."""
    p = copy_of(pipe, tmp_path / "pipe")
    p.cfg["compress"] = {"input": "train", "steps": [{"quantize": {"mode": "static", "calibration": {"samples": 64}}}],
                         "max_accuracy_drop": 0.05, "objective": "size"}  # INT8 kept for its size
    write_config(p.config, p.cfg)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_ABSENT)
    cmds = [["compress", "-c", str(p.config), "-q"], ["export", "-c", str(p.config), "-q", "--set", "export.targets=auto"]]
    results = _child(p, cmds, [site], {"EDGECLI_TEST_ABSENT": "ai_edge_litert,litert_torch,executorch,openvino,nncf"})
    assert [rc for rc, _ in results] == [0, 0], results
    card = _card(p)
    auto = card["auto"]
    rows = {r["candidate"]: r for r in auto["rows"]}
    assert card["quantized"] and set(rows) == {"onnx:int8", "onnx:fp32"}, list(rows)
    assert auto["baseline"] == "onnx:fp32" and all(r["runs"] > 0 for r in rows.values())
    assert auto["chosen"] == min(rows, key=lambda c: rows[c]["p50_ms"])
    for extra in ("litert", "executorch", "openvino"):
        assert any(n.startswith(f"{extra} not tried") and f"pip install -e '.[{extra}]'" in n for n in auto["notes"])
    published = {t["file"] for t in card["targets"]}
    if auto["chosen"] == "onnx:fp32":
        fp32 = p.run_dir / "export" / "model-fp32.onnx"
        assert fp32.read_bytes() == (p.run_dir / "train" / "model.onnx").read_bytes()
        assert published == {"model.onnx", "model.ort", "model-fp32.onnx"}
    else:
        assert published == {"model.onnx", "model.ort"}
