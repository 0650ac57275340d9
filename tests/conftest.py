"""Shared test helpers: tiny configs, three ways to run a stage, and a small digits model trained once per session.

The tiers (pick the cheapest one that can see the behaviour under test):

1. **library**: call the module under test (``edgecli.training.fit``, ``edgecli.compression.prune...``)
   on tiny tensors or models. Most of test_data, test_quantize, test_distill.
2. **in-process stage** (the default for stage tests), two helpers that reuse the CLI's own path:
   - ``run_stage(stage, config, *sets, **kwargs)`` makes the very call ``edgecli.cli._invoke`` makes,
     ``edgecli.stages.<stage>.run(load_config(config, sets), ArtifactStore.for_config(cfg), ...)``, and
     returns the ``StageResult``: assert on its fields and on the files it published. A failure is a
     Python traceback in this process, not captured stderr.
   - ``cli(*args)`` runs the typer app itself in this process (``typer.testing.CliRunner``) and returns
     ``returncode``/``stdout``/``stderr`` like a subprocess would: for tests of the one-line messages, the
     exit codes and the tables the funnel prints. An exception the funnel does not know is re-raised
     with its traceback instead of becoming "error: unexpected ..." (``unexpected="report"`` keeps it).
   Neither pays a torch import per call (2-3 s each on a loaded 2-core machine).
3. **subprocess**: ``edgecli(*args)`` spawns ``python -m edgecli``. Kept only where a real process is the
   point: exit codes of the console entry point, stdout kept clean of library chatter at the fd level,
   signals (SIGTERM/SIGKILL, closed pipes), locks held by another process, and what a fresh process
   imports (``--help`` without torch, infer without torch/sklearn).
4. **slow** (``-m slow``) and **gpu**: longer runs and CUDA-only checks, outside the default suite.

The suite runs under pytest-xdist (``-n auto --dist loadfile``, set in pyproject.toml): one worker per
core, each test file on one worker (the longest files first), so a module-scoped fixture runs once and
the session ones once per worker. test_runtimes and test_profile share a worker: both start from
``exported_edge``, whose converters (LiteRT, ExecuTorch, OpenVINO) take ~10 s to import. Each worker (and
every process it starts) gets one OpenMP thread unless OMP_NUM_THREADS is set: with a worker per core, a
second thread per worker only contends (a tiny DP-SGD step ran 20x slower with two threads on a busy
2-vCPU machine). ``-n 0`` runs the suite in this process, with the library's
default threads.

Fixtures that train (``trained_cnn`` here, the module-scoped ones in test files) train once into a
``tmp_path_factory`` directory; tests copy them (``copy_pipeline``) before changing anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from edgecli.runtimes.targets import BACKEND_TARGET, TARGETS  # no torch: OMP_NUM_THREADS below still applies

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # set before torch is first imported in this worker
    os.environ.setdefault("OMP_NUM_THREADS", "1")
CLI_ENV = {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}


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
    full_env = {**os.environ, **CLI_ENV, **(env or {})}
    full_env.pop("EDGECLI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgecli", *args], cwd=cwd, input=input, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class _Chdir:
    def __init__(self, cwd):
        self.cwd, self.old = cwd, None

    def __enter__(self):
        if self.cwd is not None:
            self.old = os.getcwd()
            os.chdir(self.cwd)

    def __exit__(self, *exc):
        if self.old is not None:
            os.chdir(self.old)


def cli(*args: str, cwd: Path | None = None, input: str | None = None, env: dict | None = None,
        unexpected: str = "raise") -> CliResult:
    """Run ``edgecli <args>`` in this process through the typer app: same parsing, funnel and exit code.

    ``unexpected="raise"`` re-raises an exception the error table does not know (a bug) with its
    traceback; ``"report"`` lets the funnel print its one line as the installed CLI would.
    """
    from typer.testing import CliRunner

    import edgecli.cli as cli_mod
    from edgecli.report import set_quiet

    original = cli_mod.report_unexpected

    def _raise(exc):
        if isinstance(exc, RecursionError):  # a known answer ("input nested too deeply"), not a bug
            return original(exc)
        raise exc

    old_term = signal.getsignal(signal.SIGTERM)
    old_verbose = os.environ.get("EDGECLI_VERBOSE")
    cli_mod.report_unexpected = _raise if unexpected == "raise" else original
    try:
        with _Chdir(cwd):
            r = CliRunner().invoke(cli_mod.app, list(args), input=input, catch_exceptions=False,
                                   env={**CLI_ENV, "EDGECLI_DEBUG": None, **(env or {})})
    finally:
        # _invoke sets process-wide state for a one-shot process: undo it for the next test
        cli_mod.report_unexpected = original
        cli_mod._term_pending = False
        signal.signal(signal.SIGTERM, old_term)
        set_quiet(False)
        if old_verbose is None:
            os.environ.pop("EDGECLI_VERBOSE", None)
    return CliResult(r.exit_code, r.stdout, r.stderr)


def run_stage(stage: str, config: str | Path, *sets: str, force: bool = False, **kwargs):
    """``edgecli <stage> -c config --set ...`` as the library call the CLI makes; returns the StageResult."""
    from edgecli.artifacts import ArtifactStore
    from edgecli.cli import _stage_module
    from edgecli.config import load_config

    cfg = load_config(config, list(sets))
    return _stage_module(stage).run(cfg, ArtifactStore.for_config(cfg), force=force, quiet=True, **kwargs)


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
    """A tiny digits CNN trained once per session, in this process (about 5 s).

    Tests must not modify its artifacts; copy the directory (``copy_pipeline``) to change things.
    """
    d = tmp_path_factory.mktemp("trained_cnn")
    cfg = tiny_config("tiny", d / "artifacts")
    cfg_path = write_config(d / "config.yaml", cfg)
    assert run_stage("train", cfg_path).status == "done"
    return Pipeline(d, cfg_path, cfg)


EDGE_TARGETS = list(BACKEND_TARGET.values())  # tflite, pte, openvino: the runtime layer's own table


def edge_installed(target: str) -> bool:
    from edgecli import runtimes

    return runtimes.get(TARGETS[target][0]).unavailable() is None


@pytest.fixture(scope="session")
def exported_edge(trained_cnn, tmp_path_factory) -> Pipeline:
    """``trained_cnn`` exported to onnx, ort and every edge target installed here, in this process.

    Tests must not modify it; copy it (``copy_of``) first.
    """
    p = copy_of(trained_cnn, tmp_path_factory.mktemp("exported_edge") / "pipe")
    p.cfg["export"] = {"targets": ["onnx", "ort", *[t for t in EDGE_TARGETS if edge_installed(t)]]}
    write_config(p.config, p.cfg)
    r = cli("export", "-c", str(p.config), "-q", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    return p


# test files that share a worker (and so its session fixtures); every other file is a unit of its own
XDIST_GROUPS = {"test_profile.py": "tests/test_runtimes.py"}
# the files that take longest (wall seconds on 2 cores: 60, 28, 28, 27, 25, 16, 14, 14, 13), started first
# so that no worker is left running one of them alone at the end (pyproject.toml's --no-loadscope-reorder
# keeps this order; xdist would otherwise order files by their number of tests)
LONGEST_FIRST = ["test_runtimes.py", "test_profile.py", "test_distributed.py", "test_hardening_faults.py",
                 "test_text.py", "test_privacy.py", "test_security.py", "test_hardening_config.py",
                 "test_hardening_training.py", "test_serve.py"]


def pytest_collection_modifyitems(config, items):
    """Files in LONGEST_FIRST order, then the rest as collected (a stable sort: every worker agrees)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the files of an XDIST_GROUPS entry sent to one worker as one unit.

    (``--dist loadgroup`` would do this with marks, but it renames node ids, which pytest 9.2 ignores.)
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return XDIST_GROUPS.get(Path(scope).name, scope)

    return GroupedFiles(config, log)


def copy_of(p: Pipeline, dst: Path) -> Pipeline:
    """A copy of pipeline ``p`` (config and artifacts) at ``dst``, its config pointing at the copy."""
    import shutil

    shutil.copytree(p.dir, dst)
    cfg = dict(p.cfg, artifacts_dir=str(dst / "artifacts"))
    return Pipeline(dst, write_config(dst / "config.yaml", cfg), cfg)


@pytest.fixture
def copy_pipeline(tmp_path):
    """Copy a session pipeline into this test's tmp dir so the test may change it."""
    return lambda p: copy_of(p, tmp_path / "pipe")
