"""The train stage end to end, in process (cli/run_stage): accuracy, artifacts, skip, resume, locking.

Subprocesses only where another process is the point: the run killed with SIGKILL, the lock holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from edgecli.artifacts import ArtifactStore, sha256_file
from tests.conftest import REPO, cli, tiny_config, write_config


def test_digits_cnn_shipped_config_reaches_97_percent(tmp_path):
    r = cli("train", "-c", str(REPO / "configs/digits-cnn.yaml"), "--set", f"artifacts_dir={tmp_path}", "--json", "-q")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "done"
    metrics = json.loads((tmp_path / "digits-cnn/train/metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.97
    assert res["metrics"]["test_accuracy"] == metrics["test"]["accuracy"]


def test_train_publishes_verified_artifacts(trained_cnn):
    d = trained_cnn.run_dir / "train"
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "manifest.json", "metrics.json", "model.onnx", "weights.safetensors"]
    m = trained_cnn.manifest("train")
    for name, digest in m["outputs"].items():
        assert sha256_file(d / name) == digest
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["max_abs_diff"] <= 1e-4
    assert m["versions"]["torch"].startswith("2.") and "onnxruntime" in m["versions"]
    assert m["config"]["epochs"] == trained_cnn.cfg["train"]["epochs"]
    assert m["split_sizes"] == {"train": 1079, "val": 359, "test": 359}  # stratified, seeded
    metrics = json.loads((d / "metrics.json").read_text())
    for split in ("val", "test"):
        for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "confusion_matrix"):
            assert k in metrics[split]
        cm = np.array(metrics[split]["confusion_matrix"])
        assert cm.shape == (10, 10) and cm.sum() == metrics[split]["num_samples"]
        assert metrics[split]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert metrics["test"]["accuracy"] > 0.9
    # ONNX: opset >= 17, dynamic batch axis, weights inside the file
    model = onnx.load(str(d / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not any(p.name.endswith(".data") for p in d.iterdir())
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key == "edgecli.model_info"}
    assert meta["edgecli.model_info"]["class_names"] == [str(i) for i in range(10)]


def test_second_run_is_skipped_and_force_reruns(copy_pipeline, trained_cnn):
    p = copy_pipeline(trained_cnn)
    before = p.manifest("train")
    t0 = time.time()
    r = cli("train", "-c", str(p.config), cwd=p.dir)
    assert r.returncode == 0 and "up to date" in r.stderr
    assert time.time() - t0 < 30  # generous: no training happened
    assert p.manifest("train") == before
    r = cli("train", "-c", str(p.config), "--force", "-q", "--set", "train.epochs=1", cwd=p.dir)
    assert r.returncode == 0, r.stderr
    assert p.manifest("train")["fingerprint"] != before["fingerprint"]


def test_changed_config_retrains(copy_pipeline, trained_cnn):
    p = copy_pipeline(trained_cnn)
    r = cli("train", "-c", str(p.config), "-q", "--set", "train.epochs=1", cwd=p.dir)
    assert r.returncode == 0 and "up to date" not in r.stderr
    assert p.manifest("train")["config"]["epochs"] == 1


def _start_train(cfg_path, cwd, *extra):
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgecli", "train", "-c", str(cfg_path), *extra], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_leaves_nothing_published_and_resume_finishes(tmp_path):
    cfg = tiny_config("killme", tmp_path / "artifacts", train={"epochs": 8, "batch_size": 32, "lr": 0.004})
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = _start_train(path, tmp_path)
    ckpt = tmp_path / "artifacts/killme/.checkpoints/train/last.pt"
    assert _wait_for(ckpt.exists), "no checkpoint written"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "artifacts/killme"
    assert not (run / "train").exists()
    r = cli("train", "-c", str(path), "--resume", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "train/manifest.json").read_text())
    assert m["resumed_from_epoch"] is not None and m["resumed_from_epoch"] >= 1
    assert [h["epoch"] for h in m["history"]] == list(range(1, m["history"][-1]["epoch"] + 1))
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    assert ArtifactStore(tmp_path / "artifacts", "killme").verify("train")


def test_second_concurrent_writer_fails_fast(tmp_path):
    cfg = tiny_config("busy", tmp_path / "artifacts", train={"epochs": 30, "batch_size": 16})
    path = write_config(tmp_path / "c.yaml", cfg)
    first = _start_train(path, tmp_path)
    try:
        lock = tmp_path / "artifacts/busy/.lock"
        assert _wait_for(lambda: lock.exists() and '"active": true' in lock.read_text())
        t0 = time.time()
        r = cli("train", "-c", str(path), cwd=tmp_path)
        assert r.returncode == 2
        assert f"is in use by pid {first.pid}" in r.stderr
        assert time.time() - t0 < 30
    finally:
        first.kill()
        first.wait()


def test_transfer_learning_with_frozen_features(copy_pipeline, trained_cnn, tmp_path):
    from safetensors.numpy import load_file

    src = trained_cnn.run_dir / "train"
    cfg = tiny_config("transfer", tmp_path / "art2",
                      train={"epochs": 2, "init_from": str(src), "freeze": ["features"], "lr": 0.01})
    path = write_config(tmp_path / "t.yaml", cfg)
    r = cli("train", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "initialised" in r.stderr and "froze" in r.stderr
    old = load_file(str(src / "weights.safetensors"))
    new = load_file(str(tmp_path / "art2/transfer/train/weights.safetensors"))
    assert np.array_equal(old["features.0.0.weight"], new["features.0.0.weight"])  # frozen
    assert not np.array_equal(old["classifier.weight"], new["classifier.weight"])  # trained
    m = json.loads((tmp_path / "art2/transfer/train/metrics.json").read_text())
    assert m["test"]["accuracy"] > 0.85


def test_freeze_typo_is_a_config_error(tmp_path, trained_cnn):
    cfg = tiny_config("typo", tmp_path / "a", train={"epochs": 1, "freeze": ["featurs"]})
    r = cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert r.returncode == 2
    assert "train.freeze: 'featurs' matches no parameter (did you mean 'features'?)" in r.stderr


def test_class_weights_balanced_counts():
    import torch

    from edgecli.training import class_weights

    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 2, "balanced")
    assert torch.allclose(w, torch.tensor([100 / 180, 100 / 20]))
