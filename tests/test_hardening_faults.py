"""Hardening, family 5: kills, Ctrl-C, concurrent writers, stale locks, full disks, read-only directories.

The promise under test: whatever happens to a run, every published stage verifies against its
manifest, temporary directories are cleaned (or ignored) by the next run, and ``--resume`` finishes
the work. Kill points are seeded random delays; a few run by default, dozens under ``-m slow``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgecli.artifacts import ArtifactStore
from edgecli.errors import EdgeError
from tests.conftest import cli, edgecli, tiny_config, write_config
from tests.test_hardening_config import assert_user_error, snapshot


def _sigint_default() -> None:
    """A suite started in the background (`cmd &`, nohup) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt: give the child the default disposition a terminal user's edgecli has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("EDGECLI_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "edgecli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_sigint_default)


def _wait_for(pred, timeout=120.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _published(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")] if run.is_dir() else []


def _assert_consistent(art: Path, name: str) -> None:
    """Every visible stage directory verifies; nothing half-written is visible."""
    store = ArtifactStore(art, name)
    for stage in _published(store.run_dir):
        assert store.verify(stage), f"published stage {stage} does not verify"


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name] if run.is_dir() else []


def _kill_train_then_resume(tmp_path: Path, seed: int, *, republish: bool) -> None:
    rng = random.Random(seed)
    art = tmp_path / "art"
    cfg = tiny_config("k", art, train={"epochs": 4, "batch_size": 64, "lr": 0.004})
    path = write_config(tmp_path / "c.yaml", cfg)
    if republish:  # a good stage exists; a killed --force rerun must leave it intact
        r = cli("train", "-c", str(path), "-q", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        before = json.loads((art / "k/train/manifest.json").read_text())
    proc = _popen("train", "-c", str(path), "-q", *(["--force"] if republish else []), cwd=tmp_path)
    time.sleep(rng.uniform(0.2, 7.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    run = art / "k"
    _assert_consistent(art, "k")
    if republish:
        assert (run / "train").is_dir(), "a killed rerun removed the published stage"
        now = json.loads((run / "train/manifest.json").read_text())
        assert now["fingerprint"] == before["fingerprint"]
    lock = json.loads((run / ".lock").read_text() or "{}") if (run / ".lock").is_file() else {}
    r = cli("train", "-c", str(path), "--resume", cwd=tmp_path)  # not -q: the reclaim note is a status line
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # (a skipped stage does not print the note: run_stage returns before adding it)
    if lock.get("active") and lock.get("pid") == proc.pid and "up to date" not in r.stderr:
        assert f"reclaimed a stale lock left by pid {proc.pid}" in r.stderr
    assert ArtifactStore(art, "k").verify("train")
    assert _leftovers(run) == []  # the next run cleaned what the killed one left
    m = json.loads((run / "train/manifest.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4] or m["history"][-1]["epoch"] == 4


@pytest.mark.parametrize("seed,republish", [(1, False), (2, True)])
def test_sigkill_at_a_seeded_point_then_resume(tmp_path, seed, republish):
    _kill_train_then_resume(tmp_path, seed, republish=republish)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 124))
def test_sigkill_soak(tmp_path, seed):
    _kill_train_then_resume(tmp_path, seed, republish=seed % 2 == 0)


def test_sigint_says_so_at_once_and_exits_130(tmp_path):
    art = tmp_path / "art"
    path = write_config(tmp_path / "c.yaml", tiny_config("int", art, train={"epochs": 40, "batch_size": 16}))
    proc = _popen("train", "-c", str(path), cwd=tmp_path)
    assert _wait_for((art / "int/.checkpoints/train/last.pt").exists), "training never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    said = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(said) == 1 and "nothing half-written was published" in said[0]
    assert out == ""
    run = art / "int"
    assert _published(run) == [] and _leftovers(run) == []
    assert json.loads((run / ".lock").read_text())["active"] is False  # released, not stale


def test_sigterm_unwinds_like_ctrl_c_and_exits_143(tmp_path):
    art = tmp_path / "art"
    path = write_config(tmp_path / "c.yaml", tiny_config("term", art, train={"epochs": 40, "batch_size": 16}))
    proc = _popen("train", "-c", str(path), cwd=tmp_path)
    assert _wait_for((art / "term/.checkpoints/train/last.pt").exists), "training never started"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and out == ""
    said = [ln for ln in err.splitlines() if ln.startswith("terminated")]
    assert len(said) == 1 and "SIGTERM" in said[0]
    assert _published(art / "term") == [] and _leftovers(art / "term") == []


def test_sigterm_while_shutting_down_after_an_error_prints_no_traceback(tmp_path):
    # torchrun SIGTERMs the surviving ranks when one fails; a rank that has already printed its one-line
    # error may get the signal while the interpreter runs its exit finalizers (seen in CI: a traceback
    # out of torch.library's weakref finalizer). Here the signal arrives from an atexit hook, as late.
    script = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1), print('survived', file=sys.stderr)))\n"
        "from edgecli.cli import main\n"
        "sys.argv = ['edgecli', 'train', '-c', 'missing.yaml']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "survived" not in proc.stderr, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    assert len(said) == 1 and "missing.yaml" in said[0], proc.stderr
    assert proc.returncode == 143


def _kill_stage_then_rerun(pipe, stage: str, seed: int) -> None:
    """SIGKILL `stage` at a seeded point; the published stages still verify and a rerun completes."""
    rng = random.Random(seed)
    art = Path(pipe.cfg["artifacts_dir"])
    name = pipe.cfg["name"]
    proc = _popen(stage, "-c", str(pipe.config), "-q", "--force", cwd=pipe.dir)
    time.sleep(rng.uniform(0.3, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    _assert_consistent(art, name)
    assert ArtifactStore(art, name).verify("train"), "a killed later stage touched train/"
    r = cli(stage, "-c", str(pipe.config), "-q", cwd=pipe.dir)
    assert r.returncode == 0, r.stderr
    assert ArtifactStore(art, name).verify(stage)
    assert _leftovers(art / name) == []


@pytest.mark.parametrize("stage,seed", [("compress", 11), ("export", 12)])
def test_sigkill_during_compress_and_export(trained_cnn, copy_pipeline, stage, seed):
    pipe = copy_pipeline(trained_cnn)
    pipe.cfg["compress"] = {"steps": [{"quantize": {"mode": "static", "calibration": {"samples": 64}}}]}
    write_config(pipe.config, pipe.cfg)
    if stage == "export":  # a published compress stage feeds export
        r = cli("compress", "-c", str(pipe.config), "-q", cwd=pipe.dir)
        assert r.returncode == 0, r.stderr
    _kill_stage_then_rerun(pipe, stage, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 216))
def test_sigkill_compress_export_soak(trained_cnn, copy_pipeline, seed):
    pipe = copy_pipeline(trained_cnn)
    pipe.cfg["compress"] = {"steps": [{"quantize": {"mode": "auto", "calibration": {"samples": 64}}}]}
    write_config(pipe.config, pipe.cfg)
    assert edgecli("compress", "-c", str(pipe.config), "-q", cwd=pipe.dir).returncode == 0
    _kill_stage_then_rerun(pipe, "export" if seed % 2 else "compress", seed)


def test_second_writer_fails_fast_naming_the_holder(tmp_path):
    art = tmp_path / "art"
    path = write_config(tmp_path / "c.yaml", tiny_config("busy", art, train={"epochs": 1}))
    store = ArtifactStore(art, "busy")
    with store.lock("edgecli compress (held by this test)"):
        before = snapshot(tmp_path)
        r = edgecli("train", "-c", str(path), cwd=tmp_path)
        assert_user_error(r, 2, "locked", f"is in use by pid {os.getpid()}", "edgecli compress (held by this test)")
        assert "epoch" not in r.stderr  # failed before any work
        assert snapshot(tmp_path) == before
    with store.lock("again"):  # released: a new holder gets it
        pass


def test_stale_lock_from_a_killed_run_is_reclaimed(tmp_path):
    art = tmp_path / "art"
    run = art / "st"
    run.mkdir(parents=True)
    (run / ".stage.tmp-424242").mkdir()  # what a killed writer leaves behind: begin's marker, half a stage
    (run / ".stage.tmp-424242" / ".edgecli-stage").write_bytes(b"")
    (run / ".stage.tmp-424242" / "half.onnx").write_bytes(b"half")
    (run / ".lock").write_text(json.dumps({"pid": 424242, "host": "h", "command": "edgecli train", "active": True}))
    store = ArtifactStore(art, "st")
    with store.lock("edgecli train"):
        assert store.stale_lock_message == "reclaimed a stale lock left by pid 424242 (edgecli train)"
        assert _leftovers(run) == []
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def _publish(store: ArtifactStore, stage: str, payload: bytes):
    w = store.begin(stage)
    (w.dir / "model.onnx").write_bytes(payload)
    return store.publish(w, config={}, fingerprint=payload.hex()[:16])


def test_disk_full_during_publish_keeps_the_previous_artifact(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "art", "full")
    with store.lock("t"):
        _publish(store, "export", b"old model")
    real = os.replace
    calls = []

    def full(src, dst, *a, **kw):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst).name == "export" and ".tmp-" in Path(src).name:  # the final swap into place
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full)
    with store.lock("t"):
        w = store.begin("export")
        (w.dir / "model.onnx").write_bytes(b"new model")
        with pytest.raises(EdgeError, match="disk full while publishing .*export; the previous export stage is intact"):
            try:
                store.publish(w, config={}, fingerprint="new")
            except EdgeError:
                store.discard(w)
                raise
    monkeypatch.setattr(os, "replace", real)
    assert any(".old-" in dst for _, dst in calls) or any(".old-" in src for src, _ in calls)
    assert (store.stage_dir("export") / "model.onnx").read_bytes() == b"old model"
    assert store.verify("export")
    with store.lock("t"):
        pass
    assert _leftovers(store.run_dir) == []


@contextlib.contextmanager
def _tmpfs(path: Path, opts: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_disk_full_mid_stage_keeps_the_published_stage(tmp_path, trained_cnn):
    """A real full filesystem (a 3 MB tmpfs, filled up) under a --force rerun of train."""
    with _tmpfs(tmp_path / "disk", "size=3m") as disk:
        shutil.copytree(trained_cnn.run_dir, disk / "tiny")
        path = write_config(tmp_path / "c.yaml", dict(trained_cnn.cfg, artifacts_dir=str(disk)))
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - 20_000))
        before = snapshot(disk / "tiny" / "train")
        r = cli("train", "-c", str(path), "--force", "-q", "--set", "train.epochs=1", cwd=tmp_path)
        assert r.returncode in (1, 2), r.stderr
        assert "Traceback" not in r.stderr
        assert "No space left on device" in r.stderr or "disk full" in r.stderr
        assert snapshot(disk / "tiny" / "train") == before
        assert ArtifactStore(disk, "tiny").verify("train")
        assert _leftovers(disk / "tiny") == []


def test_read_only_artifacts_directory_is_detected_before_training(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config("ro", tmp_path / "ro" / "art", train={"epochs": 30}))
    if os.geteuid() == 0:
        ctx = _tmpfs(tmp_path / "ro", "ro,size=1m")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        ctx = contextlib.nullcontext()
    with ctx:
        r = cli("train", "-c", str(path), cwd=tmp_path)
        assert_user_error(r, 2, "usage error", f"artifacts directory {tmp_path / 'ro'} is not writable")
        assert "epoch" not in r.stderr
    (tmp_path / "ro").chmod(0o755)


def test_artifacts_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = write_config(tmp_path / "c.yaml", tiny_config("f", tmp_path / "afile" / "sub"))
    before = snapshot(tmp_path)
    r = cli("train", "-c", str(path), cwd=tmp_path)
    assert_user_error(r, 2, "usage error", "is not a directory; set artifacts_dir to a directory")
    assert snapshot(tmp_path) == before
