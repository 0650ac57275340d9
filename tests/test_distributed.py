"""torchrun: DDP training on CPU (gloo), rank-0-only artifacts and output, failure of one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgecli.artifacts import ArtifactStore
from tests.conftest import REPO, edgecli

CFG = str(REPO / "configs/digits-cnn.yaml")


def _torchrun(*args, cwd, env_extra=None, **kw):
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "edgecli", *args]
    return cmd, env


def test_torchrun_two_processes_matches_single_process(tmp_path):
    sets = ["--set", "train.epochs=4", "--set", "train.early_stopping=null"]
    cmd, env = _torchrun("train", "-c", CFG, "--set", f"artifacts_dir={tmp_path / 'ddp'}", *sets, "--json", cwd=tmp_path)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out_lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(out_lines) == 1, "only rank 0 prints a result"
    ddp = json.loads(out_lines[0])
    # progress: each epoch reported once (rank 0 only)
    for e in range(1, 5):
        assert r.stderr.count(f"epoch {e}/4 ") == 1, r.stderr
    run = tmp_path / "ddp/digits-cnn"
    assert sorted(p.name for p in (run / "train").iterdir()) == [
        "config.yaml", "manifest.json", "metrics.json", "model.onnx", "weights.safetensors"]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    man = json.loads((run / "train/manifest.json").read_text())
    assert man["world_size"] == 2 and ArtifactStore(tmp_path / "ddp", "digits-cnn").verify("train")

    single = edgecli("train", "-c", CFG, "--set", f"artifacts_dir={tmp_path / 'one'}", *sets, "--json", "-q")
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout)
    assert abs(ddp["metrics"]["test_accuracy"] - one["metrics"]["test_accuracy"]) <= 0.02
    assert ddp["metrics"]["test_accuracy"] >= 0.9


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(d.name))
    return out


def test_killing_one_rank_ends_the_run_and_publishes_nothing(tmp_path):
    art = tmp_path / "art"
    cmd, env = _torchrun("train", "-c", CFG, "--set", f"artifacts_dir={art}", "--set", "train.epochs=400",
                         "--set", "train.batch_size=16", "--set", "train.early_stopping=null",
                         "--set", "train.dist_timeout_s=20", "-q", cwd=tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = art / "digits-cnn/.checkpoints/train/last.pt"
        t0 = time.time()
        while not ckpt.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() - t0 < 120, "training never checkpointed"
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2
        killed_at = time.time()
        os.kill(workers[-1], signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert time.time() - killed_at < 60  # well within train.dist_timeout_s + teardown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (art / "digits-cnn/train").exists()
    # what the killed run left is hidden and is cleaned by the next writer
    run = art / "digits-cnn"
    assert all(p.name.startswith(".") for p in run.iterdir())
    with ArtifactStore(art, "digits-cnn").lock("test"):
        assert not [p for p in run.iterdir() if ".tmp-" in p.name]
