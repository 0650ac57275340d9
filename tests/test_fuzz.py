"""Property-based fuzzing (hypothesis) of everything a user hands edgecli: configs, --set strings,
JSON lines on stdin, CSV / .npy / image bytes.

The invariant is the same for all: the exit code is 0, 1 or 2, no traceback is printed, ``--json``
stdout is empty or strict JSON (no NaN), every error is one line, and nothing is written outside the
run directory. In-process where possible, few examples, no deadline: the whole module stays well
under a minute on two cores. (The mutated-ONNX soak lives in the slow tier: test_hardening_models.)
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgecli.errors import EdgeError  # noqa: E402
from tests.test_hardening_config import snapshot  # noqa: E402
from tests.test_security import _tiny_onnx  # noqa: E402

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# --------------------------------------------------------------------------- strategies

KEYS = ["name", "artifacts_dir", "seed", "data", "model", "train", "compress", "export", "bench", "infer",
        "dataset", "path", "preprocess", "resize", "arch", "args", "epochs", "batch_size", "lr", "steps",
        "quantize", "mode", "threads", "top_k", "input", "budgets", "models", "runs", "warmup", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.sampled_from(KEYS), c, max_size=4)),
                      max_leaves=12)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
set_strings = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.lists(st.sampled_from(KEYS + ["0", "1", ""]), min_size=1, max_size=5)
              .map(".".join), st.text(max_size=30)),
    st.text(max_size=40),
)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=10)),
                           lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=6), c,
                                                                                         max_size=4)),
                           max_leaves=20)
requests = st.one_of(
    st.fixed_dictionaries({}, optional={"id": json_values, "input": json_values, "features": json_values,
                                        "path": st.one_of(st.text(max_size=30), json_values),
                                        "pixels": json_values, "text": json_values}),
    json_values,
)
lines = st.one_of(requests.map(json.dumps), st.text(max_size=60).map(lambda s: s.replace("\n", " ")),
                  st.sampled_from(['{"id": NaN, "input": [1]}', '{"input": [1e999, 0, 0, 0]}', "[" * 5000,
                                   '{"id": 1, "input": [[1.0, 2.0, 3.0, 4.0]]}', '{"path": "/dev/zero"}']))


def _one_line_errors(text: str) -> None:
    assert "Traceback" not in text, text
    for ln in text.splitlines():
        assert ln.strip() == "" or ln.split(":", 1)[0].strip() in (
            "error", "config error", "usage error", "data error", "model error", "artifact error", "hint",
            "locked", "check failed", "infer", "note") or ln.startswith(("Usage:", "Try ", "╭", "│", "╰", " ")), ln


# --------------------------------------------------------------------------- configs and --set


@FAST
@given(cfg=configs, sets=st.lists(set_strings, max_size=3))
def test_random_configs_and_set_strings_load_or_fail_with_config_errors(tmp_path_factory, cfg, sets):
    from edgecli.config import load_config

    d = tmp_path_factory.mktemp("cfg")
    p = d / "c.yaml"
    try:
        p.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    except yaml.YAMLError:
        return
    try:
        load_config(p, sets)
    except EdgeError as e:
        assert e.exit_code == 2 and all("\n" not in ln for ln in e.lines())


@FAST
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))),
       sets=st.lists(set_strings, max_size=2))
def test_random_yaml_text_through_the_cli(tmp_path_factory, text, sets):
    """`edgecli validate` and `train --dry-run` in-process: exit 0/1/2, one-line errors, nothing written."""
    from typer.testing import CliRunner

    from edgecli.cli import app

    d = tmp_path_factory.mktemp("cli")
    (d / "c.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    before = snapshot(d)
    args = [a for s in sets for a in ("--set", s)]
    for cmd in (["validate", "-c", str(d / "c.yaml"), *args], ["train", "-c", str(d / "c.yaml"), "--dry-run", *args]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code in (0, 1, 2), (cmd, r.exit_code, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert "Traceback" not in r.output
    assert snapshot(d) == before


# --------------------------------------------------------------------------- JSON lines on stdin


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two published export stages: a model with no edgecli metadata (model inputs) and one with table
    preprocessing (features). Published through the real store, so infer reads them as stages (verified
    by sha256, no probe process per example)."""
    from edgecli.artifacts import ArtifactStore

    d = tmp_path_factory.mktemp("fuzzmodels")
    spec = {"kind": "table", "raw_shape": [4], "input_shape": [4], "mean": [0.0] * 4, "std": [1.0] * 4}
    meta = {"edgecli.model_info": json.dumps({"kind": "table", "preprocess": spec, "class_names": ["a", "b", "c"]})}
    out = {"dir": d}
    for name, m in (("plain", None), ("table", meta)):
        store = ArtifactStore(d / "art", name)
        with store.lock("fuzz fixture"):
            w = store.begin("export")
            _tiny_onnx(w.path("model.onnx"), meta=m)
            store.publish(w, config={}, fingerprint="fuzz")
        out[name] = name
    return out


def _cfg(d: Path, models: dict, kind: str):
    from edgecli.config import load_config
    from tests.conftest import tiny_config, write_config

    return load_config(write_config(d / "c.yaml", tiny_config(kind, models["dir"] / "art", infer={"input": "export"})))


def _strict(stdout: str) -> list:
    def bad(c):
        raise AssertionError(f"non-strict JSON constant {c}")

    return [json.loads(ln, parse_constant=bad) for ln in stdout.splitlines() if ln.strip()]


@FAST
@given(stream=st.lists(lines, min_size=1, max_size=6), kind=st.sampled_from(["plain", "table"]))
def test_random_json_lines_on_stdin(models, tmp_path_factory, monkeypatch, capsys, stream, kind):
    from edgecli.artifacts import ArtifactStore
    from edgecli.stages import infer

    d = tmp_path_factory.mktemp("stdin")
    cfg = _cfg(d, models, kind)
    before = snapshot(models["dir"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(stream) + "\n"))
    res = infer.run(cfg, ArtifactStore.for_config(cfg), quiet=True, inputs=["-"], json_out_stream=True)
    out = capsys.readouterr()
    assert res.exit_code in (0, 1)
    answers = _strict(out.out)
    assert len(answers) == sum(1 for ln in stream if ln.strip())  # one answer or error per request
    _one_line_errors(out.err)
    after = snapshot(models["dir"])
    assert after == before, set(after) ^ set(before)  # infer writes nothing


# --------------------------------------------------------------------------- CSV, .npy and image bytes


def _valid_files(d: Path) -> dict[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    npy = io.BytesIO()
    np.save(npy, np.ones((2, 4), np.float32))
    return {".png": buf.getvalue(), ".npy": npy.getvalue(), ".csv": b"a,b,c,d\n1,2,3,4\n5,6,7,8\n"}


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


@FAST
@given(suffix=st.sampled_from([".png", ".npy", ".csv"]),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 400)), raw=st.one_of(st.none(), st.binary(max_size=400)))
def test_random_file_bytes_are_answered_or_one_line_errors(tmp_path_factory, suffix, edits, cut, raw):
    from edgecli.inputs import reader_for

    d = tmp_path_factory.mktemp("bytes")
    data = raw if raw is not None else _mutate(_valid_files(d)[suffix], edits, cut)
    f = d / f"in{suffix}"
    f.write_bytes(data)
    if suffix == ".png":
        spec = {"kind": "image", "raw_shape": [8, 8, 1], "input_shape": [1, 8, 8], "scale": 1 / 255}
        rd = reader_for({"kind": "image", "preprocess": spec}, [{"name": "x", "shape": [None, 1, 8, 8], "dtype": "float32"}])
    else:
        spec = {"kind": "table", "raw_shape": [4], "input_shape": [4]}
        rd = reader_for({"kind": "table", "preprocess": spec}, [{"name": "x", "shape": [None, 4], "dtype": "float32"}])
    s = rd.argument(str(f))  # never raises
    assert (s.error is None) != (s.feeds is None)
    if s.error:
        assert "\n" not in s.error and str(f) in s.error
    else:
        assert all(np.isfinite(v).all() for v in s.feeds.values())


# --------------------------------------------------------------------------- a few real processes


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(stream=st.lists(lines, min_size=1, max_size=4))
def test_cli_infer_json_stdin_subprocess(models, tmp_path_factory, stream):
    from tests.conftest import edgecli, tiny_config, write_config

    d = tmp_path_factory.mktemp("sub")
    cfg = write_config(d / "c.yaml", tiny_config("plain", models["dir"] / "art", infer={"input": "export"}))
    before = snapshot(models["dir"]), snapshot(d)
    r = edgecli("infer", "-c", str(cfg), "--json", "-", cwd=d, input="\n".join(stream) + "\n", timeout=120)
    assert r.returncode in (0, 1, 2), r.stderr
    _strict(r.stdout)
    _one_line_errors(r.stderr)
    assert (snapshot(models["dir"]), snapshot(d)) == before
