"""Shared test helpers: tiny configs, a CLI runner, and a small digits model trained once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(name: str = "tiny", artifacts: str | Path = "artifacts", **sections) -> dict:
    """A fast digits-cnn pipeline (8x8 input, a few epochs); ``sections`` override whole sections."""
    cfg = {
        "name": name,
        "artifacts_dir": str(artifacts),
        "seed": 0,
        "data": {"dataset": "digits", "val_split": 0.2, "test_split": 0.2},
        "model": {"arch": "cnn", "args": {"channels": [16, 32, 32]}},
        "train": {"epochs": 6, "batch_size": 64, "lr": 0.004},
        "bench": {"warmup": 5, "runs": 30, "batch_sizes": [1], "threads": [1], "repeats": 1},
    }
    for k, v in sections.items():
        cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def edgecli(*args: str, cwd: Path | None = None, input: str | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (real exit codes, real stdout/stderr)."""
    full_env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200", **(env or {})}
    full_env.pop("EDGECLI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgecli", *args], cwd=cwd, input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


@dataclass
class Pipeline:
    dir: Path  # working directory holding config.yaml and artifacts/
    config: Path
    cfg: dict

    @property
    def run_dir(self) -> Path:
        return self.dir / "artifacts" / self.cfg["name"]

    def manifest(self, stage: str) -> dict:
        return json.loads((self.run_dir / stage / "manifest.json").read_text())


@pytest.fixture(scope="session")
def trained_cnn(tmp_path_factory) -> Pipeline:
    """A tiny digits CNN trained once per session through the real CLI (about 5 s).

    Tests must not modify its artifacts; copy the directory (``copy_pipeline``) to change things.
    """
    d = tmp_path_factory.mktemp("trained_cnn")
    cfg = tiny_config("tiny", d / "artifacts")
    cfg_path = write_config(d / "config.yaml", cfg)
    r = edgecli("train", "-c", str(cfg_path), "-q", cwd=d)
    assert r.returncode == 0, r.stderr
    return Pipeline(d, cfg_path, cfg)


@pytest.fixture
def copy_pipeline(tmp_path):
    """Copy a session pipeline into this test's tmp dir so the test may change it."""
    import shutil

    def _copy(p: Pipeline) -> Pipeline:
        dst = tmp_path / "pipe"
        shutil.copytree(p.dir, dst)
        cfg = dict(p.cfg, artifacts_dir=str(dst / "artifacts"))
        return Pipeline(dst, write_config(dst / "config.yaml", cfg), cfg)

    return _copy
