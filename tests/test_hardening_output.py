"""Hardening, family 6: output contracts for scripts and CI.

Every subcommand with ``--json``, stdout piped to a file, ``NO_COLOR=1`` and ``TERM=dumb``:
stdout parses as JSON (one document, or one per line for infer) or is empty, holds no ANSI
escape and no progress bar; exit codes follow the table in edgecli/errors.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from edgecli import errors
from tests.conftest import edgecli, write_config
from tests.test_hardening_config import assert_user_error

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"[━█▇▆▅▄▃▂▁]|\r")


def _clean(text: str) -> None:
    assert not ANSI.search(text), repr(text[:300])
    assert not BAR.search(text), repr(text[:300])


def _json_docs(stdout: str) -> list:
    _clean(stdout)
    if not stdout.strip():
        return []
    try:
        return [json.loads(stdout)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in stdout.splitlines() if line.strip()]  # JSON lines


@pytest.fixture(scope="module")
def pipe(trained_cnn, tmp_path_factory):
    """A copy of the session pipeline with a fast compress/export/bench configured."""
    import shutil

    from tests.conftest import Pipeline

    d = tmp_path_factory.mktemp("out")
    shutil.copytree(trained_cnn.dir, d / "p")
    cfg = dict(trained_cnn.cfg, artifacts_dir=str(d / "p" / "artifacts"),
               # objective size: no latency confirmation, and one bench model: the output is under test here
               compress={"steps": [{"quantize": {"mode": "static", "force": True, "calibration": {"samples": 32}}}],
                         "objective": "size"},
               bench={"warmup": 2, "runs": 5, "torch_baseline": False, "batch_sizes": [1], "threads": [1],
                      "models": ["export"]},
               export={"ort_format": False})
    return Pipeline(d / "p", write_config(d / "p" / "config.yaml", cfg), cfg)


def test_every_stage_json_is_clean(pipe, tmp_path):
    for stage in ("train", "compress", "export", "bench"):
        r = edgecli(stage, "-c", str(pipe.config), "--json", cwd=pipe.dir)
        assert r.returncode == 0, (stage, r.stderr)
        assert "Traceback" not in r.stderr
        (doc,) = _json_docs(r.stdout)
        assert doc["stage"] == stage and doc["exit_code"] == 0
        _clean(r.stderr)


def test_infer_json_lines_are_clean(pipe, tmp_path):
    r = edgecli("export", "-c", str(pipe.config), "-q", cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    from sklearn.datasets import load_digits

    img = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    Image.fromarray(img, "L").save(tmp_path / "d.png")
    np.save(tmp_path / "nan.npy", np.full((1, 8, 8, 1), np.nan, np.float32))
    r = edgecli("infer", str(tmp_path / "d.png"), "-c", str(pipe.config), "--json", cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    docs = _json_docs(r.stdout)
    assert len(docs) == 1 and docs[0]
    _clean(r.stderr)
    # an input that cannot be answered: still JSON on stdout (or nothing), a non-zero exit from the table
    r = edgecli("infer", str(tmp_path / "nan.npy"), "-c", str(pipe.config), "--json", cwd=pipe.dir)
    assert r.returncode in (errors.EXIT_CHECK_FAILED, errors.EXIT_USAGE), r.stderr
    assert "Traceback" not in r.stderr
    _json_docs(r.stdout)


@pytest.mark.parametrize("stage", ["train", "compress", "export", "bench", "validate"])
def test_errors_leave_stdout_empty(pipe, stage):
    args = [stage, "-c", str(pipe.config), "--set", "train.epochs=zero"] + ([] if stage == "validate" else ["--json"])
    r = edgecli(*args, cwd=pipe.dir)
    assert_user_error(r, errors.EXIT_USAGE, "config error", "--set train.epochs")
    assert r.stdout == ""


def test_infer_error_leaves_stdout_empty(pipe, tmp_path):
    r = edgecli("infer", str(tmp_path / "missing.png"), "-c", str(pipe.config), "--json", "--set", "infer.top_k=0",
                cwd=pipe.dir)
    assert_user_error(r, errors.EXIT_USAGE, "config error", "infer.top_k")
    assert r.stdout == ""


def test_dry_run_and_help_are_plain(pipe):
    import yaml

    r = edgecli("train", "-c", str(pipe.config), "--dry-run", cwd=pipe.dir)
    assert r.returncode == 0
    _clean(r.stdout)
    assert yaml.safe_load(r.stdout)["name"] == pipe.cfg["name"]
    for args in (["--help"], ["train", "--help"], ["--version"]):
        r = edgecli(*args)
        assert r.returncode == 0
        _clean(r.stdout + r.stderr)


def test_unknown_option_is_usage_exit_2():
    r = edgecli("train", "--no-such-flag")
    assert r.returncode == errors.EXIT_USAGE
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_exit_code_table_matches_the_error_types():
    doc = errors.__doc__
    table = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s+(\d+)\s+(.+)$", doc, re.M)}
    assert set(table) == {0, 1, 2, 130, 143}
    assert "check failed" in table[1] and "bad usage" in table[2] and "interrupted" in table[130]
    assert "SIGTERM" in table[143] and errors.EXIT_TERMINATED == 143
    for cls in (errors.ConfigError, errors.UsageError, errors.DataError, errors.ModelFileError, errors.ArtifactError,
                errors.LockError, errors.NotImplementedStage):
        assert cls.exit_code == errors.EXIT_USAGE == 2, cls
    from edgecli.training import TrainingDiverged

    for cls in (errors.CheckFailed, TrainingDiverged):
        assert cls.exit_code == errors.EXIT_CHECK_FAILED == 1, cls
    assert errors.report(KeyboardInterrupt()) == errors.EXIT_INTERRUPTED == 130
