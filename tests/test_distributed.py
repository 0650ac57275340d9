"""torchrun on CPU (gloo): DDP training, rank-0-only artifacts and output, resume, failure of one rank.

Each test launches the real ``python -m torch.distributed.run`` with two worker processes. Worker
output goes to per-rank log files (``--log-dir --redirects 3``) so a test can tell which rank printed what.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgecli.artifacts import ArtifactStore
from tests.conftest import REPO, cli, tiny_config, write_config

CFG = str(REPO / "configs/digits-cnn.yaml")
TRAIN_FILES = ["config.yaml", "manifest.json", "metrics.json", "model.onnx", "weights.safetensors"]


def _torchrun(args: list[str], log_dir: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1"}
    env.pop("EDGECLI_DEBUG", None)
    # --standalone: a local c10d rendezvous on a free port (several tests may run torchrun at once)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(log_dir), "--redirects", "3", "-m", "edgecli", *args]
    return cmd, env


def _rank_logs(log_dir: Path, rank: int) -> tuple[str, str]:
    """(stdout, stderr) of one local rank, from torchrun's per-rank log files (latest attempt)."""
    outs = sorted(log_dir.glob(f"*/attempt_*/{rank}/stdout.log"), key=lambda p: p.stat().st_mtime)
    assert outs, f"no torchrun logs for rank {rank} under {log_dir}"
    d = outs[-1].parent
    return (d / "stdout.log").read_text(), (d / "stderr.log").read_text()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return sorted(out)


def test_torchrun_two_processes_matches_single_process(tmp_path):
    sets = ["--set", "train.epochs=3", "--set", "train.early_stopping=null"]
    logs = tmp_path / "logs"
    cmd, env = _torchrun(["train", "-c", CFG, "--set", f"artifacts_dir={tmp_path / 'ddp'}", *sets, "--json"], logs)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out0, err0 = _rank_logs(logs, 0)
    out1, err1 = _rank_logs(logs, 1)
    assert r.returncode == 0, (err0 + err1 + r.stderr)[-3000:]

    # rank 0 alone reports: one JSON result, one progress line per epoch; rank 1 prints nothing at all
    lines = [ln for ln in out0.splitlines() if ln.strip()]
    assert len(lines) == 1, out0
    ddp = json.loads(lines[0])
    for e in (1, 2, 3):
        assert err0.count(f"epoch {e}/3 ") == 1, err0
    assert out1 == "" and err1 == "", (out1, err1)

    # one published stage, verified, nothing left beside it; the checkpoint is gone once published
    run = tmp_path / "ddp/digits-cnn"
    assert sorted(p.name for p in (run / "train").iterdir()) == TRAIN_FILES
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["train"]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not (run / ".checkpoints/train/last.pt").exists()
    assert ArtifactStore(tmp_path / "ddp", "digits-cnn").verify("train")
    man = json.loads((run / "train/manifest.json").read_text())
    assert man["world_size"] == 2
    assert [h["epoch"] for h in man["history"]] == [1, 2, 3]
    assert "per process per step" in " ".join(ddp["messages"])

    # same global batch (64 = 2 x 32) and seed in one process: the same model quality
    single = cli("train", "-c", CFG, "--set", f"artifacts_dir={tmp_path / 'one'}", *sets, "--json", "-q")
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout)
    assert ddp["metrics"]["test_accuracy"] >= 0.9, ddp["metrics"]
    assert abs(ddp["metrics"]["test_accuracy"] - one["metrics"]["test_accuracy"]) <= 0.02, (ddp["metrics"], one["metrics"])

    # unchanged config under torchrun: rank 0 decides to skip and every rank follows
    r2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    out0, _ = _rank_logs(logs, 0)
    out1, err1 = _rank_logs(logs, 1)
    assert json.loads(out0)["status"] == "skipped"
    assert out1 == "" and err1 == ""
    assert json.loads((run / "train/manifest.json").read_text())["created"] == man["created"]


def test_killing_one_rank_ends_the_run_then_resume_finishes(tmp_path):
    EPOCHS = 5  # killed after the first epoch's checkpoint: four more to resume
    art = tmp_path / "art"
    logs = tmp_path / "logs"
    timeout_s = 20
    args = ["train", "-c", CFG, "--set", f"artifacts_dir={art}", "--set", f"train.epochs={EPOCHS}",
            "--set", "train.batch_size=32", "--set", "train.early_stopping=null",
            "--set", f"train.dist_timeout_s={timeout_s}", "-q"]
    cmd, env = _torchrun(args, logs)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = art / "digits-cnn/.checkpoints/train/last.pt"
    try:
        t0 = time.time()
        while not ckpt.exists():  # rank 0 checkpoints after each epoch: kill after the first
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 180, "training never checkpointed"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=timeout_s + 60)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert elapsed < timeout_s, f"the run took {elapsed:.0f} s to end after a rank died"
    _, err0 = _rank_logs(logs, 0)
    # the survivor says why in one line, and the launcher names the dead rank. Which line depends on a
    # race: rank 0 notices the dead peer at its next collective, unless torchrun's SIGTERM comes first.
    said = [ln for ln in err0.splitlines() if ln.startswith(("error:", "terminated:"))]
    assert len(said) == 1, err0[-2000:]
    assert ("another torchrun process failed or stopped answering" in said[0]
            or "terminated: stopped by SIGTERM; nothing half-written was published" in said[0]), said[0]
    assert "Traceback" not in err0
    assert "SIGKILL" in err
    run = art / "digits-cnn"
    assert not (run / "train").exists()
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == []
    assert ckpt.is_file()

    # --resume under torchrun: rank 0 reads its checkpoint and every rank continues from it
    cmd, env = _torchrun([*args, "--resume", "--json"], logs)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out0, err0 = _rank_logs(logs, 0)
    assert r.returncode == 0, (err0 + r.stderr)[-3000:]
    res = json.loads(out0)
    man = json.loads((run / "train/manifest.json").read_text())
    assert man["resumed_from_epoch"] >= 1 and man["world_size"] == 2
    assert [h["epoch"] for h in man["history"]] == list(range(1, EPOCHS + 1))
    assert res["metrics"]["epochs_run"] == EPOCHS and res["metrics"]["test_accuracy"] >= 0.9
    assert not ckpt.exists()
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_rank0_failure_before_training_stops_every_rank(tmp_path):
    """A locked run directory: rank 0 cannot start, and rank 1 must not train (or wait) alone."""
    art = tmp_path / "art"
    logs = tmp_path / "logs"
    cmd, env = _torchrun(["train", "-c", CFG, "--set", f"artifacts_dir={art}", "--set", "train.epochs=1"], logs)
    with ArtifactStore(art, "digits-cnn").lock("a test holding the run"):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    _, err0 = _rank_logs(logs, 0)
    _, err1 = _rank_logs(logs, 1)
    assert "is in use" in err0 and "a test holding the run" in err0, err0
    assert "rank 1: rank 0 stopped the run" in err1, err1
    assert "epoch" not in err0 + err1
    assert not (art / "digits-cnn/train").exists()


def test_global_batch_must_divide_among_processes(tmp_path, monkeypatch):
    from edgecli.config import load_config
    from edgecli.errors import ConfigError
    from edgecli.stages import train

    path = write_config(tmp_path / "c.yaml", tiny_config("odd", tmp_path / "art", train={"epochs": 1, "batch_size": 63}))
    cfg = load_config(path, [])
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=r"train.batch_size: 63 is the global batch .* 2 torchrun processes"):
        train.run(cfg, ArtifactStore.for_config(cfg))
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_a_stalled_rank_times_out(tmp_path):
    """SIGSTOP, not death: no socket closes, so only train.dist_timeout_s can end the wait."""
    art = tmp_path / "art"
    logs = tmp_path / "logs"
    timeout_s = 15
    cmd, env = _torchrun(["train", "-c", CFG, "--set", f"artifacts_dir={art}", "--set", "train.epochs=8",
                          "--set", "train.batch_size=16", "--set", f"train.dist_timeout_s={timeout_s}", "-q"], logs)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = art / "digits-cnn/.checkpoints/train/last.pt"
    workers: list[int] = []
    try:
        t0 = time.time()
        while not ckpt.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 180
            time.sleep(0.05)
        workers = _children(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)
        # torchrun then gives the stopped worker 30 s to honour SIGTERM before SIGKILL
        proc.communicate(timeout=timeout_s + 90)
    finally:
        for pid in workers:
            with __import__("contextlib").suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    _, err0 = _rank_logs(logs, 0)
    assert f"Timed out waiting {timeout_s * 1000}ms" in err0, err0[-2000:]
    assert "another torchrun process failed or stopped answering" in err0
    assert not (art / "digits-cnn/train").exists()
