"""Devices: train.device / train.amp, and GPU execution providers in ONNX Runtime.

Tests marked ``gpu`` need a CUDA device and skip with the reason where there is none; the others
check, on any machine, what a user without a GPU sees when asking for one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import cli, edgecli, tiny_config, write_config

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_cuda = pytest.mark.skipif(_cuda_count() == 0, reason="no CUDA device (torch.cuda.is_available() is False)")
no_cuda = pytest.mark.skipif(_cuda_count() > 0, reason="checks the no-GPU behaviour; this machine has a CUDA device")


# --------------------------------------------------------------------------- any machine


def test_resolve_providers_keeps_available_reports_absent_and_falls_back_to_cpu():
    import onnxruntime as ort

    from edgecli.runtimes.ort import resolve_providers

    avail = ort.get_available_providers()
    usable, skipped = resolve_providers([*GPU_PROVIDERS, "CPUExecutionProvider"])
    assert usable == [p for p in [*GPU_PROVIDERS, "CPUExecutionProvider"] if p in avail]
    assert skipped == [p for p in GPU_PROVIDERS if p not in avail]
    # CPU is appended as the last resort even when not asked for
    usable, skipped = resolve_providers(["CUDAExecutionProvider"])
    assert usable[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in skipped) == ("CUDAExecutionProvider" not in avail)
    assert resolve_providers(None) == (["CPUExecutionProvider"], [])


def test_session_asking_for_absent_gpu_providers_runs_on_cpu(trained_cnn):
    import onnxruntime as ort

    from edgecli.runtimes.ort import make_session, run_batched

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; the GPU test covers this case")
    model = trained_cnn.run_dir / "train/model.onnx"
    sess = make_session(model, providers=[*GPU_PROVIDERS, "CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    ref = run_batched(make_session(model), x)
    np.testing.assert_array_equal(run_batched(sess, x), ref)


def test_device_and_amp_resolution_without_gpu():
    import torch

    from edgecli.errors import ConfigError
    from edgecli.training import amp_dtype, pick_device

    assert pick_device("cpu") == torch.device("cpu")
    # amp applies on CUDA only: on the CPU it trains in float32 rather than failing
    assert amp_dtype("bf16", torch.device("cpu")) is None
    assert amp_dtype("fp16", torch.device("cpu")) is None
    assert amp_dtype("none", torch.device("cpu")) is None
    if _cuda_count() == 0:
        assert pick_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ConfigError, match="no CUDA device is available"):
                pick_device(name)


def test_bad_device_name_is_a_config_error(tmp_path):
    from edgecli.config import load_config
    from edgecli.errors import ConfigError

    path = write_config(tmp_path / "c.yaml", tiny_config("dev", tmp_path / "art", train={"device": "gpu0"}))
    with pytest.raises(ConfigError, match=r"train\.device.*auto, cpu, cuda or cuda:N"):
        load_config(path, [])


@no_cuda
def test_cli_asking_for_cuda_without_one_exits_2_with_one_line(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config("nocuda", tmp_path / "art"))
    r = cli("train", "-c", str(path), "--set", "train.device=cuda", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["config error: train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)"]
    assert not (tmp_path / "art/nocuda/train").exists()


def test_cli_amp_on_cpu_says_it_trained_in_float32(tmp_path):
    if _cuda_count():
        pytest.skip("auto picks the GPU here; the GPU tests cover amp")
    path = write_config(tmp_path / "c.yaml", tiny_config("ampcpu", tmp_path / "art", train={"epochs": 1, "amp": "bf16"}))
    r = cli("train", "-c", str(path), "--json", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "train.amp=bf16 applies on CUDA only; trained in float32 on cpu" in res["messages"]


# --------------------------------------------------------------------------- CUDA machines


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_train_on_cuda_with_amp(tmp_path, amp):
    import torch

    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16")
    path = write_config(tmp_path / "c.yaml", tiny_config("gpu", tmp_path / "art", train={
        "epochs": 8, "batch_size": 64, "lr": 0.004, "device": "cuda", "amp": amp}))
    r = edgecli("train", "-c", str(path), "--json", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["metrics"]["test_accuracy"] >= 0.9, res["metrics"]
    # the ONNX file (exported from the CPU copy) agrees with the CUDA-trained weights
    assert res["metrics"]["parity_top1_agreement"] == 1.0
    man = json.loads((tmp_path / "art/gpu/train/manifest.json").read_text())
    assert man["config"]["device"] == "cuda" and man["config"]["amp"] == amp


@pytest.mark.gpu
@needs_cuda
def test_pick_device_on_cuda(monkeypatch):
    import torch

    from edgecli.errors import ConfigError
    from edgecli.training import amp_dtype, pick_device

    n = torch.cuda.device_count()
    assert pick_device("auto") == torch.device("cuda:0")
    assert pick_device("cuda", local_rank=n - 1) == torch.device(f"cuda:{n - 1}")
    assert pick_device(f"cuda:{n - 1}") == torch.device(f"cuda:{n - 1}")
    with pytest.raises(ConfigError, match=f"only {n} CUDA device"):
        pick_device(f"cuda:{n}")
    with pytest.raises(ConfigError, match="--nproc_per_node"):
        pick_device("cuda", local_rank=n)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="pins every torchrun process to one GPU"):
        pick_device("cuda:0")
    assert amp_dtype("fp16", torch.device("cuda:0")) == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_count() < 2, reason="DDP over NCCL needs at least 2 CUDA devices")
def test_torchrun_nccl_two_gpus(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config("nccl", tmp_path / "art", train={
        "epochs": 6, "batch_size": 64, "lr": 0.004, "device": "cuda"}))
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "edgecli", "train", "-c", str(path), "--json", "-q"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["metrics"]["test_accuracy"] >= 0.9
    assert json.loads((tmp_path / "art/nccl/train/manifest.json").read_text())["world_size"] == 2


@pytest.mark.gpu
def test_cuda_execution_provider_matches_cpu(trained_cnn):
    import onnxruntime as ort

    from edgecli.runtimes.ort import make_session, run_batched

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (pip install -e '.[gpu]' on a CUDA machine)")
    if _cuda_count() == 0:
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    model = trained_cnn.run_dir / "train/model.onnx"
    sess = make_session(model, providers=["CUDAExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    ref = run_batched(make_session(model), x)
    got = run_batched(sess, x)
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
