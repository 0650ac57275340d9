"""Security and faults, round 2 (issue 13): one test per numbered finding of the adversarial review.

1. code named in an artifact is never imported; 2. writes never follow links; 3. only what edgecli
made is replaced or removed; 4. no reader blocks or reads without bound; 5. the error funnel is
total; 6. one bad infer input never stops the others; 7. the smaller items.
Readers that would hang or eat memory on a broken build run in a child process with a timeout and
an address-space limit, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgecli.artifacts import ArtifactStore
from edgecli.errors import ArtifactError, ConfigError, DataError, EdgeError, ModelFileError, UsageError
from tests.conftest import REPO, cli, edgecli, tiny_config, write_config
from tests.test_hardening_config import assert_user_error, snapshot

# --------------------------------------------------------------------------- helpers


def _child(code: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter under a 3 GB address-space limit and a timeout."""
    pre = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("EDGECLI_DEBUG", None)
    try:
        return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked for {timeout} s:\n{code}")


def _tiny_onnx(path: Path, *, n_in: int = 4, n_out: int = 3, batch_sized: bool = True, meta: dict | None = None,
               label_first: bool = False, no_input: bool = False) -> Path:
    """A small float model: x[N, n_in] @ W -> [N, n_out] (or a fixed [1, n_out] output, or label + probs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(n_in * n_out, dtype=np.float32).reshape(n_in, n_out) / 10.0, "W")
    nodes, outputs, inits = [], [], [w]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])]
    if no_input:
        nodes.append(helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(
            np.ones((1, n_out), np.float32))))
        inputs, inits = [], []
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out]))
    elif label_first:
        nodes += [helper.make_node("MatMul", ["x", "W"], ["s"]), helper.make_node("Softmax", ["s"], ["probabilities"]),
                  helper.make_node("ArgMax", ["s"], ["label"], axis=1, keepdims=0)]
        outputs += [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                    helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])]
    elif batch_sized:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out]))
    else:
        nodes += [helper.make_node("MatMul", ["x", "W"], ["m"]),
                  helper.make_node("ReduceMean", ["m"], ["y"], axes=[0], keepdims=1)]
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out]))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for k, v in (meta or {}).items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(m, str(path))
    return path


def _cfg(tmp_path: Path, **sections):
    from edgecli.config import load_config

    return load_config(write_config(tmp_path / "c.yaml", tiny_config("t", tmp_path / "art", **sections)))


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w x h pixels (a decompression bomb's header) and holds no image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _npy_claiming(path: Path, shape: tuple) -> Path:
    """An .npy whose header claims ``shape`` (float64) but which holds only 80 bytes of data."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    h = repr(header).encode()
    pad = 64 - (10 + len(h) + 1) % 64
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h) + pad + 1) + h + b" " * pad + b"\n"
                     + np.zeros(10).tobytes())
    return path


def _infer(cfg, store, inputs, monkeypatch, capsys, stdin: str | None = None, json_out: bool = True):
    import io

    from edgecli.stages import infer

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    res = infer.run(cfg, store, quiet=True, inputs=inputs, json_out_stream=json_out)
    out = capsys.readouterr()
    return res, out.out, out.err


def _strict_lines(stdout: str) -> list[dict]:
    def bad(c):
        raise AssertionError(f"non-strict JSON constant {c} on stdout")

    return [json.loads(ln, parse_constant=bad) for ln in stdout.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- 1. no code from artifacts


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A trained tiny pipeline whose train manifest names code in a module planted beside it."""
    from tests.conftest import Pipeline

    d = tmp_path_factory.mktemp("hostile")
    cfg = tiny_config("tiny", d / "artifacts", train={"epochs": 1, "batch_size": 64})
    path = write_config(d / "config.yaml", cfg)
    r = cli("train", "-c", str(path), "-q", cwd=d)
    assert r.returncode == 0, r.stderr
    return Pipeline(d, path, cfg)


def _plant(run_dir: Path, where: Path, arch: str) -> Path:
    """Point the train manifest's model_info.arch at ``arch``; plant evilmod.py that leaves a marker."""
    marker = where / "PWNED"
    (where / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    mp = run_dir / "train" / "manifest.json"
    m = json.loads(mp.read_text())
    m["model_info"]["arch"] = arch
    mp.write_text(json.dumps(m))
    return marker


def test_1_code_named_in_an_artifact_is_never_imported(hostile_run, copy_pipeline, tmp_path):
    p = copy_pipeline(hostile_run)
    marker = _plant(p.run_dir, p.dir, "evilmod:Evil")
    # bench's PyTorch baseline builds the train stage's architecture
    r = edgecli("bench", "-c", str(p.config), "-q", "--set", "bench.runs=5", cwd=p.dir)
    assert not marker.exists(), "bench imported code named in a manifest"
    assert_user_error(r, 2, "artifact error", "evilmod:Evil")
    # compress's PyTorch steps, in-process
    from edgecli.config import load_config
    from edgecli.stages import compress

    cfg = load_config(p.config, ["compress.steps=[{sparsity: {ratio: 0.5}}]"])
    sys.path.insert(0, str(p.dir))
    try:
        with pytest.raises(ArtifactError, match="evilmod:Evil"):
            compress.run(cfg, ArtifactStore.for_config(cfg), quiet=True)
        assert not marker.exists(), "compress imported code named in a manifest"
        # a distill teacher directory whose manifest names code (this pipeline's own manifest is clean again)
        teacher = tmp_path / "teacher"
        shutil.copytree(p.run_dir / "train", teacher)
        mp = p.run_dir / "train" / "manifest.json"
        m = json.loads(mp.read_text())
        m["model_info"]["arch"] = "cnn"
        mp.write_text(json.dumps(m))
        cfg = load_config(p.config, [f"compress.steps=[{{distill: {{teacher: '{teacher}', epochs: 1}}}}]"])
        with pytest.raises(ArtifactError, match="evilmod:Evil"):
            compress.run(cfg, ArtifactStore.for_config(cfg), quiet=True, force=True)
        assert not marker.exists(), "distill imported code named in a teacher's manifest"
    finally:
        sys.path.remove(str(p.dir))
        sys.modules.pop("evilmod", None)


def test_1_an_artifact_naming_the_configs_own_class_is_accepted():
    from edgecli.models import trusted_info

    info = {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "args": {}}
    assert trusted_info(info, ("cnn",), "m.json")["arch"] == "cnn"
    assert trusted_info({**info, "arch": "mypkg.mod:Net"}, ("mypkg.mod:Net",), "m.json")["arch"] == "mypkg.mod:Net"
    with pytest.raises(ArtifactError, match="torch.hub:load"):
        trusted_info({**info, "arch": "torch.hub:load"}, ("cnn",), "m.json")


# --------------------------------------------------------------------------- 2. no writes through links


def test_2_a_symlinked_lock_or_checkpoint_dir_is_refused_and_nothing_is_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "art" / "r"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(victim)
    store = ArtifactStore(tmp_path / "art", "r")
    with pytest.raises(ArtifactError, match=r"\.lock"), store.lock("test"):
        pass
    assert victim.read_text() == "precious"
    (run / ".lock").unlink()
    # a symlinked .checkpoints/train: recovery must not delete in the target, train must not write there
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / ".notes.tmp-1").write_text("mine")
    (target / "last.pt").write_text("mine too")
    (run / ".checkpoints").mkdir()
    (run / ".checkpoints" / "train").symlink_to(target, target_is_directory=True)
    before = snapshot(target)
    with pytest.raises(ArtifactError, match="checkpoints"):
        with store.lock("test"):
            store.checkpoint_dir("train")
    assert snapshot(target) == before


# --------------------------------------------------------------------------- 3. only edgecli's own directories


def test_3_publish_and_recovery_never_touch_what_edgecli_did_not_create(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "projects" / "train").mkdir(parents=True)
    (home / "projects" / "train" / "thesis.tex").write_text("three years of work")
    (home / "projects" / ".notes.tmp-7").mkdir()
    (home / "projects" / ".notes.tmp-7" / "draft").write_text("draft")
    (home / "projects" / ".compress.old-7").mkdir()
    (home / "projects" / ".compress.old-7" / "keep").write_text("keep")
    before = snapshot(home)
    monkeypatch.setenv("HOME", str(home))
    store = ArtifactStore("~", "projects")
    assert store.run_dir == home / "projects"  # `~` expands
    with store.lock("test"):
        with pytest.raises(ArtifactError, match="not made by edgecli"):
            store.begin("train")
    after = snapshot(home)
    after.pop("projects/.lock", None)
    assert after == before
    assert not (Path.cwd() / "~").exists()


# --------------------------------------------------------------------------- 4. readers that hang or read without bound


def test_4_fifos_and_devices_are_refused_at_once_everywhere(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "pipe.csv")
    r = _child(f"""
        import io, sys
        from edgecli.errors import EdgeError
        from edgecli.config import load_config
        from edgecli.budgets import load_baseline
        from edgecli.inputs import reader_for
        spec = {{"kind": "table", "raw_shape": [4], "input_shape": [4]}}
        rd = reader_for({{"kind": "table", "preprocess": spec}}, [{{"name": "x", "shape": [None, 4], "dtype": "float32"}}])
        for name, fn in [("config fifo", lambda: load_config({str(fifo)!r})),
                         ("config zero", lambda: load_config("/dev/zero")),
                         ("baseline fifo", lambda: load_baseline({str(fifo)!r})),
                         ("baseline zero", lambda: load_baseline("/dev/zero"))]:
            try:
                fn()
                print(name, "ACCEPTED")
            except EdgeError as e:
                print(name, "refused:", e.lines()[0])
        import shutil
        for ext in (".csv", ".npy"):
            link = {str(tmp_path)!r} + "/in" + ext
            import os
            os.symlink({str(fifo)!r}, link)
            print(ext, "fifo", rd.argument(link).error)
            os.symlink("/dev/zero", link + "z" + ext)
            print(ext, "zero", rd.argument(link + "z" + ext).error)
        print("stdin path", rd.json_line('{{"path": "{fifo}.csv"}}', "line 1").error)
    """, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9, r.stdout
    assert not any("ACCEPTED" in ln or "None" in ln for ln in lines), r.stdout
    assert all("not a regular file" in ln for ln in lines), r.stdout


def test_4_size_limits_have_a_clear_message(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate((4 << 20) + 1)  # sparse: no disk used
    from edgecli.config import load_config

    with pytest.raises(ConfigError, match="over the 4 MiB limit"):
        load_config(big)


# --------------------------------------------------------------------------- 5. a total error funnel


@pytest.mark.parametrize("override", [
    "seed=-1", f"seed={2**63}", "data.preprocess.resize=[0,8]", "data.preprocess.resize=[8,-3]",
    f"infer.threads={2**32 + 1}", "model.args." + ".".join(["a"] * 2000) + "=1",
])
def test_5_bad_config_values_are_config_errors(tmp_path, override):
    from edgecli.config import load_config

    with pytest.raises(ConfigError):
        load_config(write_config(tmp_path / "c.yaml", tiny_config("t", tmp_path / "a")), [override])


def test_5_a_model_too_large_to_allocate_is_a_config_error():
    from edgecli.models import build_model

    with pytest.raises(ConfigError, match="model"):
        build_model("mlp", [1, 8, 8], 10, {"hidden": [10**12]})


def test_5_hostile_inputs_are_one_line_errors(tmp_path):
    from edgecli.data.preprocess import load_image_file
    from edgecli.inputs import reader_for

    bomb = _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(DataError, match="pixel"):
        load_image_file(str(bomb), 1)
    spec = {"kind": "table", "raw_shape": [4], "input_shape": [4]}
    rd = reader_for({"kind": "table", "preprocess": spec}, [{"name": "x", "shape": [None, 4], "dtype": "float32"}])
    deep = rd.json_line("[" * 100_000 + "]" * 100_000, "line 1")
    assert deep.error and deep.error.startswith("line 1:")
    wide = tmp_path / "wide.csv"
    wide.write_text("1," + "9" * 200_000 + ",3,4\n")
    assert "wide.csv" in rd.argument(str(wide)).error
    # malformed edgecli metadata in a model
    from edgecli.onnxio import model_info_from_onnx

    for text in ("{not json", "[1, 2]", '{"preprocess": 7}', '{"arch": 3, "input_shape": "x"}'):
        m = _tiny_onnx(tmp_path / "m.onnx", meta={"edgecli.model_info": text})
        with pytest.raises(ModelFileError, match="edgecli.model_info"):
            model_info_from_onnx(m)


def test_5_malformed_manifests_and_baselines_are_refused_up_front(tmp_path):
    store = ArtifactStore(tmp_path, "r")
    (store.stage_dir("train")).mkdir(parents=True)
    for text in ("[1, 2, 3]", '{"stage": "train", "outputs": [1]}', '{"stage": "train"}'):
        (store.stage_dir("train") / "manifest.json").write_text(text)
        with pytest.raises(ArtifactError, match="manifest"):
            store.manifest("train")
        assert not store.verify("train")
    from edgecli.budgets import load_baseline

    for rows in ([{"model": "train", "p95_ms": "fast"}], ["row"], [{"model": "train", "provider": "CPU", "batch": 1,
                                                                    "threads": 1, "p95_ms": -1}]):
        (tmp_path / "b.json").write_text(json.dumps({"rows": rows}))
        with pytest.raises(UsageError, match="--baseline"):
            load_baseline(tmp_path / "b.json")


def test_5_cli_errors_are_one_line_never_a_traceback(tmp_path):
    r = _child("""
        import sys
        sys.argv = ["edgecli", "validate", "-c", "/dev/zero"]
        from edgecli.cli import main
        main()
    """, timeout=30)
    assert_user_error(r, 2, "config error", "/dev/zero")
    # an output not sized by the batch
    m = _tiny_onnx(tmp_path / "fixed.onnx", batch_sized=False)
    np.save(tmp_path / "three.npy", np.ones((3, 4), np.float32))
    cfg = write_config(tmp_path / "c.yaml", tiny_config("t", tmp_path / "a", infer={"input": str(m)}))
    r = edgecli("infer", "-c", str(cfg), str(tmp_path / "three.npy"), cwd=tmp_path)
    assert_user_error(r, 1, "error", "three.npy")


def test_5_the_funnel_is_total_for_exceptions_no_table_row_knows(tmp_path, monkeypatch):
    """An exception edgecli has no row for: one line naming the input while reading inputs, and one
    `error: unexpected ...` line (exit 1) anywhere else; never a traceback."""
    from typer.testing import CliRunner

    import edgecli.config as config_mod
    from edgecli.cli import app
    from edgecli.inputs import reader_for

    spec = {"kind": "table", "raw_shape": [4], "input_shape": [4]}
    rd = reader_for({"kind": "table", "preprocess": spec}, [{"name": "x", "shape": [None, 4], "dtype": "float32"}])

    def boom(*a, **k):
        raise LookupError("a failure nobody foresaw")

    monkeypatch.setattr(type(rd), "rows", boom)
    s = rd.json_line('{"features": [1, 2, 3, 4]}', "line 9")
    assert s.error == "line 9: cannot be read (LookupError: a failure nobody foresaw)"
    cfg = write_config(tmp_path / "c.yaml", tiny_config("t", tmp_path / "a"))
    monkeypatch.setattr(config_mod.PipelineConfig, "model_validate", boom)
    r = CliRunner().invoke(app, ["validate", "-c", str(cfg)])
    assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and "config error:" in r.output and "LookupError" in r.output
    monkeypatch.undo()
    import edgecli.stages.export as export_mod

    monkeypatch.setattr(export_mod, "run", boom)
    r = CliRunner().invoke(app, ["export", "-c", str(cfg)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exit_code, r.output)
    assert "Traceback" not in r.output and "error: unexpected LookupError: a failure nobody foresaw" in r.output


# --------------------------------------------------------------------------- 6. per-input isolation in infer


def test_6_one_bad_input_never_stops_the_others(tmp_path, monkeypatch, capsys):
    m = _tiny_onnx(tmp_path / "m.onnx")
    good = tmp_path / "good.npy"
    np.save(good, np.ones((1, 4), np.float32))
    liar = _npy_claiming(tmp_path / "liar.npy", (10**6, 10**6))
    cfg = _cfg(tmp_path, infer={"input": str(m)})
    res, out, err = _infer(cfg, ArtifactStore.for_config(cfg), [str(liar), str(good)], monkeypatch, capsys,
                           stdin=None)
    lines = _strict_lines(out)
    assert [ln["input"] for ln in lines] == [str(liar), str(good)]
    assert "error" in lines[0] and "top_k" in lines[1]
    assert res.exit_code == 1 and res.metrics["answered"] == 1
    # a bomb image, through a model that takes images
    from edgecli.inputs import reader_for

    spec = {"kind": "image", "raw_shape": [8, 8, 1], "input_shape": [1, 8, 8], "scale": 1 / 255}
    rd = reader_for({"kind": "image", "preprocess": spec}, [{"name": "x", "shape": [None, 1, 8, 8], "dtype": "float32"}])
    bomb = _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    assert "bomb.png" in rd.argument(str(bomb)).error


# --------------------------------------------------------------------------- 7. smaller items


def test_7_json_stdout_is_strict_even_for_a_nan_id(tmp_path, monkeypatch, capsys):
    m = _tiny_onnx(tmp_path / "m.onnx")
    cfg = _cfg(tmp_path, infer={"input": str(m)})
    stdin = '{"id": NaN, "input": [1.0, 2.0, 3.0, 4.0]}\n{"id": Infinity, "input": [1.0, 2.0, 3.0, 4.0]}\n{"id": 3, "input": [1.0, 2.0, 3.0, 4.0]}\n'
    res, out, err = _infer(cfg, ArtifactStore.for_config(cfg), ["-"], monkeypatch, capsys, stdin=stdin)
    lines = _strict_lines(out)
    assert len(lines) == 3 and lines[2]["id"] == 3 and "top_k" in lines[2]


def test_7_stage_inputs_are_resolved_inside_the_lock(trained_cnn, copy_pipeline, monkeypatch):
    import edgecli.stages as stages
    from edgecli.config import load_config
    from edgecli.stages import export

    p = copy_pipeline(trained_cnn)
    cfg = load_config(p.config)
    store = ArtifactStore.for_config(cfg)
    seen = []
    real = stages.resolve_input

    def spy(st, *a, **k):
        seen.append(st._lock_fd is not None)
        return real(st, *a, **k)

    monkeypatch.setattr(stages, "resolve_input", spy)
    export.run(cfg, store, quiet=True)
    assert seen and all(seen), "export resolved its input without holding the run lock"


def test_7_a_label_first_model_is_ranked_by_its_scores(tmp_path, monkeypatch, capsys):
    m = _tiny_onnx(tmp_path / "lab.onnx", label_first=True)
    cfg = _cfg(tmp_path, infer={"input": str(m)})
    res, out, _ = _infer(cfg, ArtifactStore.for_config(cfg), ["-"], monkeypatch, capsys,
                         stdin='{"input": [1.0, 0.0, 0.0, 0.0]}\n')
    (line,) = _strict_lines(out)
    assert line["top_k"][0]["index"] == 2 and line["top_k"][0]["prob"] < 0.99  # W row 0 = [0, .1, .2]


def test_7_yaml_aliases_are_bounded_by_expanded_size(tmp_path):
    from edgecli.config import load_config

    text = ("name: t\nmodel:\n  args:\n    a: &a '" + "x" * 100_000 + "'\n    b: &b [" + ", ".join(["*a"] * 100)
            + "]\n    c: [" + ", ".join(["*b"] * 100) + "]\n")
    (tmp_path / "c.yaml").write_text(text)
    t0 = time.time()
    with pytest.raises(ConfigError, match="expand"):
        load_config(tmp_path / "c.yaml")
    assert time.time() - t0 < 30


def test_7_zero_input_model_in_bench_is_a_model_error(tmp_path):
    from edgecli.stages.bench import select_targets

    m = _tiny_onnx(tmp_path / "z.onnx", no_input=True)
    cfg = _cfg(tmp_path, bench={"models": [str(m)], "torch_baseline": False})
    with pytest.raises(ModelFileError, match="no inputs"):
        select_targets(cfg, ArtifactStore.for_config(cfg))


def test_7_newlines_in_input_names_cannot_forge_error_lines(tmp_path):
    m = _tiny_onnx(tmp_path / "m.onnx")
    cfg = write_config(tmp_path / "c.yaml", tiny_config("t", tmp_path / "a", infer={"input": str(m)}))
    r = edgecli("infer", "-c", str(cfg), "x.npy\nerror: forged line", cwd=tmp_path)
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [ln for ln in r.stderr.splitlines()
                                                                                if "error" in ln][:1]
    assert not any(ln.startswith("error: forged") for ln in r.stderr.splitlines()), r.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has died


def test_7_killed_runs_leave_nothing_in_tmp_and_the_worker_dies_with_its_parent(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftover = tmp / f"edgecli-bench-{pid}-abcd"  # what a SIGKILLed bench (pid now gone) left behind
    leftover.mkdir()
    (leftover / "spec0.json").write_text("{}")
    foreign = tmp / "edgecli-notes"  # not named by edgecli's pattern: never touched
    foreign.mkdir()
    from edgecli.stages import export

    cfg = _cfg(tmp_path, export={"input": str(_tiny_onnx(tmp_path / "ext.onnx")), "ort_format": False})
    export.run(cfg, ArtifactStore.for_config(cfg), quiet=True)
    assert not leftover.exists() and foreign.exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith("edgecli-")] == ["edgecli-notes"]
    # the bench worker dies with the process that started it (SIGKILLed parents run no cleanup)
    m = _tiny_onnx(tmp_path / "m.onnx")
    spec = {"kind": "onnx", "model": str(m), "weights": str(m), "model_info": None, "providers": ["CPUExecutionProvider"],
            "threads": 1, "batch_sizes": [1], "warmup": 0, "runs": 10**9, "min_time_s": 300, "x": None, "y": None,
            "accuracy_samples": None, "num_classes": 3}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        w = subprocess.Popen([sys.executable, "-m", "edgecli.benchworker", {str(tmp_path / 'spec.json')!r},
                              {str(tmp_path / 'out.json')!r}])
        print(w.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wpid = int(parent.stdout.readline())
    time.sleep(2.0)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    t0 = time.time()
    while time.time() - t0 < 20 and _alive(wpid):
        time.sleep(0.1)
    alive = _alive(wpid)
    if alive:
        os.kill(wpid, signal.SIGKILL)
    assert not alive, "the bench worker outlived its killed parent"


def test_7_external_data_checks_cover_sparse_initializers_and_the_path_ort_uses(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgecli.onnxio import load_onnx

    # a sparse initializer whose values live outside the model's directory
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    d = tmp_path / "m"
    d.mkdir()
    vals = helper.make_tensor("S_values", TensorProto.FLOAT, [2], [1.0, 2.0])
    vals.ClearField("float_data")
    vals.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "8")):
        e = vals.external_data.add()
        e.key, e.value = k, v
    idx = helper.make_tensor("S_idx", TensorProto.INT64, [2], [0, 3])
    sp = helper.make_sparse_tensor(vals, idx, [4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    g = helper.make_graph([helper.make_node("Add", ["x", "S"], ["y"])], "g", [x], [y], sparse_initializer=[sp])
    g.sparse_initializer[0].values.name = "S"
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(d / "model.onnx"))
    with pytest.raises(ModelFileError, match="escapes"):
        load_onnx(d / "model.onnx", load_external=False)
    # a symlinked model: ONNX Runtime reads external data beside the path it was given, not the link target
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.mkdir()
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "W")  # raw_data: saved as external data
    g2 = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], [w])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m2, str(real / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    (link / "model.onnx").symlink_to(real / "model.onnx")
    with pytest.raises(ModelFileError, match="w.bin"):
        load_onnx(link / "model.onnx", load_external=False)
    load_onnx(real / "model.onnx", load_external=False)  # the real one is fine


def test_7_ort_files_go_through_the_child_process_probe(tmp_path):
    from edgecli.stages import resolve_input

    bad = tmp_path / "model.ort"
    bad.write_bytes(os.urandom(4096))
    store = ArtifactStore(tmp_path / "a", "r")
    with pytest.raises(ModelFileError, match="model.ort"):
        resolve_input(store, str(bad), ("export",), "infer.input")
    with pytest.raises(EdgeError):
        resolve_input(store, "/dev/zero.ort", ("export",), "infer.input")


def test_card_target_file_outside_the_bundle_is_refused(tmp_path):
    """A hostile card.json naming a target file outside the export bundle is refused before anything opens it."""
    from edgecli.errors import ArtifactError
    from edgecli.runtimes.targets import target_file

    for name in ("../../victim.tflite", "/etc/passwd", "..", ""):
        card = {"targets": [{"runtime": "litert", "target": "tflite", "precision": "fp32", "file": name}]}
        with pytest.raises(ArtifactError, match="not a plain file name"):
            target_file(card, tmp_path, "litert")
    card = {"targets": [{"runtime": "litert", "target": "tflite", "precision": "fp32", "file": "model.tflite"}]}
    assert target_file(card, tmp_path, "litert") == tmp_path / "model.tflite"
