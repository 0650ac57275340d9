"""Hardening, family 2: model files that are not what they claim, mutated, or reach outside their directory.

The fuzz loop runs mutants in a child interpreter, so a crash of ONNX Runtime would show as the
child dying of a signal (a test failure) instead of taking pytest down with it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecli.errors import ModelFileError
from edgecli.onnxio import child_verdict, load_onnx, probe_model
from tests.conftest import REPO, edgecli, tiny_config, write_config
from tests.test_hardening_config import assert_user_error, snapshot


def _model_bytes(trained_cnn) -> bytes:
    return (trained_cnn.run_dir / "train" / "model.onnx").read_bytes()


@pytest.mark.parametrize("case,needle", [
    ("truncated", "not a valid ONNX model (truncated or corrupt"),
    ("lfs", "is a Git LFS pointer, not the model; run `git lfs pull`"),
    ("empty", "empty file, not an ONNX model"),
    ("text", "not a valid ONNX model"),
])
def test_not_really_onnx(tmp_path, trained_cnn, case, needle):
    f = tmp_path / "model.onnx"
    f.write_bytes({
        "truncated": _model_bytes(trained_cnn)[:2000],
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n",
        "empty": b"",
        "text": b"<html>404 Not Found</html>\n" * 20,
    }[case])
    with pytest.raises(ModelFileError, match=re.escape(needle)):
        load_onnx(f)
    with pytest.raises(ModelFileError, match=re.escape(needle)):
        probe_model(f)


@pytest.mark.parametrize("stage", ["bench", "export"])
def test_truncated_onnx_through_the_cli(tmp_path, trained_cnn, stage):
    f = tmp_path / "model.onnx"
    f.write_bytes(_model_bytes(trained_cnn)[:3000])
    key = "bench.models=[" + str(f) + "]" if stage == "bench" else f"export.input={f}"
    cfg = write_config(tmp_path / "c.yaml", tiny_config("m", tmp_path / "art", bench={"warmup": 1, "runs": 3}))
    before = snapshot(tmp_path)
    r = edgecli(stage, "-c", str(cfg), "--set", key, "--json", cwd=tmp_path)
    assert_user_error(r, 2, "model error", f"{f}: not a valid ONNX model")
    assert r.stdout == ""
    after = snapshot(tmp_path)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} <= {"art", "art/m", "art/m/.lock"}


_FUZZ_CHILD = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    import numpy as np
    from edgecli.errors import EdgeError, report
    from edgecli.onnxio import load_onnx
    from edgecli.runtimes.ort import make_session
    src = Path(sys.argv[1]).read_bytes()
    out = Path(sys.argv[2])
    start, count = int(sys.argv[3]), int(sys.argv[4])
    kinds = {"loaded": 0, "refused": 0, "ort": 0}
    for seed in range(start, start + count):
        rng = random.Random(seed)
        b = bytearray(src)
        for _ in range(rng.randint(1, 12)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        p = out / f"m{seed}.onnx"
        p.write_bytes(bytes(b))
        try:
            load_onnx(p)
            s = make_session(p)
            i = s.get_inputs()[0]
            shape = [d if isinstance(d, int) and 0 < d < 64 else 1 for d in i.shape]
            s.run(None, {i.name: np.zeros(shape, np.float32)})
            kinds["loaded"] += 1
        except EdgeError:
            kinds["refused"] += 1
        except Exception as e:  # must be one the error funnel turns into one line, never a traceback
            assert type(e).__module__.startswith("onnxruntime"), (seed, type(e), e)
            kinds["ort"] += 1
        p.unlink()
    print(kinds)
""")


def _fuzz(tmp_path: Path, trained_cnn, start: int, count: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _FUZZ_CHILD, str(trained_cnn.run_dir / "train" / "model.onnx"),
                        str(tmp_path), str(start), str(count)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode >= 0, f"ONNX Runtime died of {signal.Signals(-r.returncode).name}: {r.stderr[-500:]}"
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_byte_mutated_onnx_never_kills_edgecli(tmp_path, trained_cnn):
    out = _fuzz(tmp_path, trained_cnn, 0, 300)
    kinds = eval(out.strip().splitlines()[-1], {})  # the child's own dict literal
    assert sum(kinds.values()) == 300 and kinds["refused"] > 0


@pytest.mark.slow
def test_byte_mutated_onnx_soak(tmp_path, trained_cnn):
    _fuzz(tmp_path, trained_cnn, 1000, 5000)


def test_probe_model_runs_untrusted_models_in_a_child(tmp_path, trained_cnn):
    good = trained_cnn.run_dir / "train" / "model.onnx"
    res = probe_model(good)
    assert res["ok"] and res["ran"] and res["inputs"][0][0] == "input"
    m = onnx.load(str(good))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2  # loads, but Conv cannot run it
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ModelFileError, match=r"bad.onnx: ONNX Runtime cannot run this model"):
        probe_model(bad)


def test_a_child_killed_by_a_signal_is_a_model_error(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert proc.returncode == -signal.SIGSEGV
    with pytest.raises(ModelFileError, match=r"m.onnx: ONNX Runtime crashed \(SIGSEGV\) loading or running this model"):
        child_verdict(tmp_path / "m.onnx", proc.returncode, "")


# --------------------------------------------------------------------------- external data


def _external_model(d: Path, location: str) -> Path:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        e = w.external_data.add()
        e.key, e.value = k, v
    w.ClearField("raw_data")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    p = d / "model.onnx"
    p.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return p


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_file", "symlink_dir", "nested_dotdot"])
def test_external_data_escaping_the_model_directory_is_refused_before_any_read(tmp_path, how):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    # a FIFO outside: reading it would block this test forever, so a pass proves nothing was read
    os.mkfifo(outside / "secret.bin")
    loc = {
        "dotdot": "../outside/secret.bin",
        "absolute": str(outside / "secret.bin"),
        "symlink_file": "weights.bin",
        "symlink_dir": "sub/secret.bin",
        "nested_dotdot": "sub/../../outside/secret.bin",
    }[how]
    if how == "symlink_file":
        (model_dir / "weights.bin").symlink_to(outside / "secret.bin")
    if how == "symlink_dir":
        (model_dir / "sub").symlink_to(outside)
    p = _external_model(model_dir, loc)
    with pytest.raises(ModelFileError, match="escapes the model's directory|resolves outside the model's directory"):
        load_onnx(p)
    with pytest.raises(ModelFileError, match="refused"):
        load_onnx(p, load_external=False)


def test_external_data_inside_the_directory_loads(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "w.bin").write_bytes(np.ones((4, 4), np.float32).tobytes())
    m = load_onnx(_external_model(model_dir, "w.bin"))
    assert numpy_helper.to_array(m.graph.initializer[0]).sum() == 16
    (model_dir / "w.bin").unlink()
    with pytest.raises(ModelFileError, match="external data file 'w.bin' is missing"):
        load_onnx(model_dir / "model.onnx")


def test_escaping_external_data_through_the_cli(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    p = _external_model(tmp_path / "m", "../secret.bin")
    cfg = write_config(tmp_path / "c.yaml", tiny_config("x", tmp_path / "art", bench={"warmup": 1, "runs": 3,
                                                                                        "torch_baseline": False}))
    r = edgecli("bench", "-c", str(cfg), "--set", f"bench.models=[{p}]", "--json", cwd=tmp_path)
    assert_user_error(r, 2, "model error", "external data location '../secret.bin' escapes the model's directory")
    assert r.stdout == ""
