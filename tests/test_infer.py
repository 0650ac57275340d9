"""infer, in process (cli) but for stdin streaming, a closed pipe and a fresh process's imports: raw PNG/.npy/JSON-lines inputs through the model's preprocessing, agreement with PyTorch, bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, Pipeline, cli, copy_of, write_config


@pytest.fixture(scope="module")
def pipe(trained_cnn, tmp_path_factory) -> Pipeline:
    """The session CNN, exported, plus 200 test-split digits written as PNG files in samples/."""
    p = copy_of(trained_cnn, tmp_path_factory.mktemp("infer") / "pipe")
    r = cli("export", "-c", str(p.config), "-q", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    spec = importlib.util.spec_from_file_location("sample_digits", REPO / "scripts" / "sample_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # the README's sample script, its main() called as `python` would
    assert script.main(["-c", str(p.config), "--out", str(p.dir / "samples"), "-n", "200"]) == 0
    return p


def _pngs(p: Pipeline) -> list[str]:
    return sorted(str(f) for f in (p.dir / "samples").glob("*.png"))


def _torch_top1(p: Pipeline, raw: np.ndarray) -> np.ndarray:
    """The PyTorch model's top-1 on raw uint8 images through the training preprocessing."""
    import torch

    from edgecli.data.preprocess import PreprocessSpec
    from edgecli.models import build_model
    from edgecli.training import load_weights_file

    info = p.manifest("train")["model_info"]
    model = build_model(info["arch"], info["input_shape"], info["num_classes"], info.get("args"))
    model.load_state_dict(load_weights_file(p.run_dir / "train" / "weights.safetensors"))
    model.eval()
    x = PreprocessSpec.from_dict(info["preprocess"]).apply(raw)
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def _png_pixels(paths: list[str]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("L"))[:, :, None] for f in paths])


def _json_lines(out: str) -> list[dict]:
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


@pytest.mark.parametrize("stage", ["train", "export"])
def test_200_pngs_agree_with_pytorch(pipe, stage):
    files = _pngs(pipe)
    assert len(files) == 200
    r = cli("infer", "-c", str(pipe.config), "--json", "-q", "--set", f"infer.input={stage}", *files, cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    res = _json_lines(r.stdout)
    assert [o["input"] for o in res] == files
    want = _torch_top1(pipe, _png_pixels(files))
    got = np.array([o["top_k"][0]["index"] for o in res])
    assert (got == want).all(), f"{int((got != want).sum())} of 200 differ from PyTorch"
    from edgecli.artifacts import sha256_file

    sha = sha256_file(pipe.run_dir / stage / "model.onnx")
    for o in res:
        assert o["model_sha256"] == sha and len(o["top_k"]) == 3 and o["latency_ms"] > 0
        assert o["top_k"][0]["label"] == str(o["top_k"][0]["index"])
        probs = [t["prob"] for t in o["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    # the labels written by the sample script: the model is right on most of them
    labels = [int(f.rsplit("label", 1)[1].split(".")[0]) for f in files]
    assert np.mean(got == np.array(labels)) > 0.85


def test_stdin_1000_json_lines(pipe):
    files = _pngs(pipe)
    px = _png_pixels(files)
    lines = [json.dumps({"id": i, "pixels": px[i % 200, :, :, 0].tolist()}) for i in range(1000)]
    r = cli("infer", "-c", str(pipe.config), "--json", "-q", "-", input="\n".join(lines) + "\n", cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    res = _json_lines(r.stdout)
    assert [o["id"] for o in res] == list(range(1000))
    want = _torch_top1(pipe, px)
    assert all(o["top_k"][0]["index"] == want[o["id"] % 200] for o in res)


def test_stdin_answers_each_line_at_once(pipe):
    """One request in, one answer out, while stdin stays open (so it can sit behind a pipe)."""
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgecli", "infer", "-c", str(pipe.config), "--json", "-q", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=pipe.dir, env=env)
    try:
        for i, f in enumerate(_pngs(pipe)[:3]):
            proc.stdin.write(json.dumps({"id": i, "path": f}) + "\n")
            proc.stdin.flush()
            ans = json.loads(proc.stdout.readline())
            assert ans["id"] == i and ans["input"] == f and ans["top_k"]
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_human_table(pipe):
    files = _pngs(pipe)[:4]
    r = cli("infer", "-c", str(pipe.config), "--top-k", "2", *files, cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    for f in files:
        assert os.path.basename(f) in r.stdout
    assert "sha256" in r.stdout and "sha256" in r.stderr


def test_bad_inputs_each_named_others_answered(pipe, tmp_path):
    good = _pngs(pipe)[0]
    cases = {}
    cases["missing.png"] = "no such file"
    (tmp_path / "adir").mkdir()
    cases["adir"] = "is a directory"
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    cases["garbage.png"] = "not a readable image"
    (tmp_path / "trunc.png").write_bytes(open(good, "rb").read()[:40])
    cases["trunc.png"] = "not a readable image"
    np.save(tmp_path / "shape.npy", np.zeros((5, 5), np.uint8))
    cases["shape.npy"] = "expected 8x8 pixels, got 5x5"
    np.save(tmp_path / "dtype.npy", np.zeros((8, 8), np.float32))
    cases["dtype.npy"] = "8-bit pixels"
    nan = np.zeros((8, 8), np.float32)
    nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases["nan.npy"] = "NaN or Inf"
    np.save(tmp_path / "rgb.npy", np.zeros((8, 8, 3), np.uint8))
    cases["rgb.npy"] = "expected 1 channel"
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["pickled.npy"] = "pickled"
    (tmp_path / "rows.csv").write_text("1,2,3\n")
    cases["rows.csv"] = "image model"
    args = [str(tmp_path / n) for n in cases]
    stdin = "\n".join([
        "{not json",
        json.dumps({"id": "k", "features": [1, 2]}),
        json.dumps({"id": "big", "pixels": (np.full((8, 8), 300)).tolist()}),
        json.dumps({"id": "inf", "pixels": [[float("inf")] * 8] * 8}).replace("Infinity", "1e999"),
        json.dumps({"id": "ok", "pixels": np.zeros((8, 8), int).tolist()}),
    ]) + "\n"
    r = cli("infer", "-c", str(pipe.config), "--json", "-q", good, *args, "-", input=stdin, cwd=pipe.dir)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    res = _json_lines(r.stdout)
    by_input = {o["input"]: o for o in res}
    assert "top_k" in by_input[good] and "top_k" in by_input["ok"]
    errs = r.stderr.splitlines()
    for name, why in cases.items():
        o = by_input[str(tmp_path / name)]
        assert why in o["error"], (name, o)
        assert any(ln.startswith("error: ") and name in ln and why in ln for ln in errs), (name, errs)
    assert "not valid JSON" in by_input["line 1"]["error"]
    assert '"pixels"' in by_input["k"]["error"]
    assert "0-255" in by_input["big"]["error"]
    assert "NaN or Inf" in by_input["inf"]["error"]
    assert len(res) == 1 + len(cases) + 5


def test_usage_errors(pipe, copy_pipeline, trained_cnn):
    r = cli("infer", "-c", str(pipe.config), cwd=pipe.dir)
    assert r.returncode == 2  # no inputs
    p = copy_pipeline(trained_cnn)  # trained, never exported
    r = cli("infer", "-c", str(p.config), _pngs(pipe)[0], cwd=p.dir)
    assert r.returncode == 2 and "export" in r.stderr and "Traceback" not in r.stderr
    r = cli("infer", "-c", str(p.config), "--set", f"infer.input={p.dir / 'nope.onnx'}", _pngs(pipe)[0], cwd=p.dir)
    assert r.returncode == 2 and "does not exist" in r.stderr
    bad = p.dir / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    r = cli("infer", "-c", str(p.config), "--set", f"infer.input={bad}", _pngs(pipe)[0], cwd=p.dir)
    assert r.returncode == 2 and "not a valid ONNX model" in r.stderr
    # weights said to live outside the model's directory are refused before anything reads them
    import onnx
    from onnx.external_data_helper import set_external_data

    m = onnx.load(str(pipe.run_dir / "export" / "model.onnx"))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    (p.dir / "outside.bin").write_bytes(t.raw_data)
    set_external_data(t, location="../outside.bin")
    t.ClearField("raw_data")
    (p.dir / "sub").mkdir()
    onnx.save(m, str(p.dir / "sub" / "escape.onnx"))
    r = cli("infer", "-c", str(p.config), "--set", f"infer.input={p.dir / 'sub' / 'escape.onnx'}",
                _pngs(pipe)[0], cwd=p.dir)
    assert r.returncode == 2 and "escapes the model's directory" in r.stderr and "Traceback" not in r.stderr


def test_model_without_metadata_takes_model_inputs(pipe, tmp_path):
    import onnx

    m = onnx.load(str(pipe.run_dir / "export" / "model.onnx"))
    del m.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(m, str(path))
    from edgecli.config import load_config
    from edgecli.data import load_splits

    x = load_splits(load_config(pipe.config)).test.x[:5]
    np.save(tmp_path / "x.npy", x)
    r = cli("infer", "-c", str(pipe.config), "--json", "-q", "--set", f"infer.input={path}",
                str(tmp_path / "x.npy"), _pngs(pipe)[0], cwd=pipe.dir)
    assert r.returncode == 1
    res = _json_lines(r.stdout)
    assert [o["input"] for o in res[:5]] == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(5)]
    assert "only takes .npy" in res[5]["error"]


def test_infer_imports_neither_torch_nor_sklearn(pipe):
    code = (
        "import sys\n"
        "from edgecli.cli import app\n"
        f"sys.argv = ['edgecli', 'infer', '-c', {str(pipe.config)!r}, '-q', '--json', {_pngs(pipe)[0]!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = [m for m in ('torch', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "clean"
    assert json.loads(r.stdout.splitlines()[0])["top_k"]


def test_table_model_csv_npy_and_json_rows(tmp_path):
    """A feature-row model: CSV (with/without header), .npy rows and JSON features, each through the
    model's own normalisation, agreeing with ONNX Runtime on the preprocessed rows; bad rows named."""
    import onnxruntime as ort

    from edgecli.data.preprocess import PreprocessSpec

    cfg = {"name": "rows", "artifacts_dir": str(tmp_path / "artifacts"), "seed": 0,
           "data": {"dataset": "synthetic", "shape": [6], "num_classes": 3, "num_samples": 300},
           "model": {"arch": "mlp"}, "train": {"epochs": 2, "batch_size": 64}}
    config = write_config(tmp_path / "config.yaml", cfg)
    r = cli("train", "-c", str(config), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 3, size=(5, 6)).round(3)
    header = ",".join([f"f{i}" for i in range(6)] + ["label"])
    (tmp_path / "with_header.csv").write_text(header + "\n" + "\n".join(",".join(map(str, r)) + ",1" for r in rows[:3]))
    (tmp_path / "plain.csv").write_text("\n".join(",".join(map(str, r)) for r in rows[3:]) + "\n")
    np.save(tmp_path / "one.npy", rows[0])
    (tmp_path / "short.csv").write_text("1,2,3\n")
    (tmp_path / "words.csv").write_text("1,2,3,4,5,x\n")
    (tmp_path / "nan.csv").write_text("1,2,3,4,5,nan\n")
    np.save(tmp_path / "img.npy", np.zeros((8, 8, 1), np.uint8))  # a 3-D array is not feature rows
    names = ["with_header.csv", "plain.csv", "one.npy", "short.csv", "words.csv", "nan.csv", "img.npy"]
    stdin = json.dumps({"id": "j", "features": rows[4].tolist()}) + "\n" + json.dumps({"id": "s", "pixels": [[1]]}) + "\n"
    r = cli("infer", "-c", str(config), "--json", "-q", "--set", "infer.input=train", *names, "-",
                input=stdin, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    res = {o["input"]: o for o in _json_lines(r.stdout)}
    model = tmp_path / "artifacts" / "rows" / "train" / "model.onnx"
    info = json.loads((tmp_path / "artifacts" / "rows" / "train" / "manifest.json").read_text())["model_info"]
    x = PreprocessSpec.from_dict(info["preprocess"]).apply(rows)
    want = ort.InferenceSession(str(model)).run(None, {"input": x})[0].argmax(1)
    answered = {"with_header.csv[0]": 0, "with_header.csv[1]": 1, "with_header.csv[2]": 2,
                "plain.csv[0]": 3, "plain.csv[1]": 4, "one.npy": 0, "j": 4}
    for name, i in answered.items():
        top = res[name]["top_k"]
        assert top[0]["index"] == want[i], name
        assert top[0]["label"] == str(want[i]) and len(top) == 3
    assert "expected 6 feature(s) per row" in res["short.csv"]["error"]
    assert "line 1: not all values are numbers" in res["words.csv"]["error"]
    assert "NaN or Inf" in res["nan.csv"]["error"]
    assert "expected feature rows" in res["img.npy"]["error"]
    assert '"features"' in res["s"]["error"]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 5 and all(any(n in ln for ln in errs) for n in ("short.csv", "words.csv", "nan.csv", "img.npy"))


def test_reader_closing_the_pipe_ends_quietly(pipe):
    """`edgecli infer - | head -1`: a closed stdout ends the session without a traceback."""
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgecli", "infer", "-c", str(pipe.config), "--json", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=pipe.dir, env=env)
    try:
        req = json.dumps({"path": _pngs(pipe)[0]}) + "\n"
        proc.stdin.write(req)
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["top_k"]
        proc.stdout.close()
        proc.stdin.write(req * 50)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "Exception ignored" not in err
        assert "stdout was closed after 1 answer(s)" in err
    finally:
        if proc.poll() is None:
            proc.kill()
