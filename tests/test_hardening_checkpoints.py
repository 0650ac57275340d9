"""Hardening, family 3: weights and checkpoints that try to run code, or are cut short.

edgecli never unpickles: weights are safetensors or ``torch.load(weights_only=True)``, and a
refusal is final (no retry with ``weights_only=False``). Every payload here would create a canary
file if it were ever unpickled.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from tests.conftest import cli, tiny_config, write_config
from tests.test_hardening_config import assert_user_error, snapshot


class _Payload:
    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _evil_pickle(path: Path, canary: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"features.0.0.weight": _Payload(canary)}, f)
    return path


def _evil_torch_zip(path: Path, canary: Path) -> Path:
    import torch

    torch.save({"model": {"classifier.weight": torch.zeros(2)}, "x": _Payload(canary)}, str(path))
    return path


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _train_refused(tmp_path: Path, init_from: str, needle: str, canary: Path):
    cfg = tiny_config("ck", tmp_path / "art", train={"epochs": 1, "init_from": init_from})
    path = write_config(tmp_path / "c.yaml", cfg)
    before = snapshot(tmp_path)
    r = cli("train", "-c", str(path), cwd=tmp_path)
    assert_user_error(r, 2, "model error", needle)
    assert not canary.exists(), "a pickle payload ran"
    # only the run lock may appear; no stage, no temp dir, no checkpoint
    assert _changed(before, snapshot(tmp_path)) <= {"art", "art/ck", "art/ck/.lock"}
    return r


def test_pickle_payload_as_init_from_is_refused_through_the_cli(tmp_path):
    canary = tmp_path / "canary"
    f = _evil_torch_zip(tmp_path / "model.pth", canary)
    r = _train_refused(tmp_path, str(f), "refused", canary)
    assert "never unpickles" in r.stderr


@pytest.mark.parametrize("fmt,name", [
    ("pickle", "weights.pt"),
    ("pickle", "weights.safetensors"),  # a pickle wearing the safe extension
    ("pickle", "weights.bin"),
    ("torchzip", "model.pth"),  # torch.save's zip format with a payload inside
    ("dir", "other"),  # a train stage directory whose weights file is a pickle
])
def test_pickle_payloads_are_refused(tmp_path, fmt, name):
    from edgecli.errors import ModelFileError
    from edgecli.stages.train import resolve_init_from
    from edgecli.training import load_weights_file

    canary = tmp_path / "canary"
    f = tmp_path / name
    if fmt == "dir":
        (f / "train").mkdir(parents=True)
        _evil_pickle(f / "train" / "weights.safetensors", canary)
    else:
        (_evil_pickle if fmt == "pickle" else _evil_torch_zip)(f, canary)
    target = resolve_init_from(str(f))
    match = "not a readable safetensors file" if target.suffix == ".safetensors" else "refused.*never unpickles"
    before = snapshot(tmp_path)
    with pytest.raises(ModelFileError, match=match) as e:
        load_weights_file(target)
    assert "\n" not in e.value.message
    assert not canary.exists()
    assert snapshot(tmp_path) == before


def test_weights_only_is_never_relaxed(tmp_path, monkeypatch):
    """In-process: every torch.load edgecli makes on a hostile file asks for weights_only=True."""
    import torch

    from edgecli.errors import ModelFileError
    from edgecli.training import _load_checkpoint, load_weights_file

    canary = tmp_path / "canary"
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    for f in (_evil_pickle(tmp_path / "a.pt", canary), _evil_torch_zip(tmp_path / "b.pth", canary)):
        with pytest.raises(ModelFileError, match="refused"):
            load_weights_file(f)
        with pytest.raises(ModelFileError, match="checkpoint unreadable"):
            _load_checkpoint(f)
    assert calls == [True] * 4
    assert not canary.exists()


def _cut(src: bytes, cut: str) -> bytes:
    return {
        "half": src[: len(src) // 2],
        "header": src[:40],
        "8bytes": src[:8],
        "empty": b"",
        # a header length of 2**62: must not try to allocate it
        "huge_header": (2**62).to_bytes(8, "little") + src[8:200],
        "garbage_header": (64).to_bytes(8, "little") + b"{not json" + b" " * 60,
    }[cut]


def test_truncated_safetensors_through_the_cli(tmp_path, trained_cnn):
    f = tmp_path / "w.safetensors"
    f.write_bytes(_cut((trained_cnn.run_dir / "train" / "weights.safetensors").read_bytes(), "half"))
    _train_refused(tmp_path, str(f), "not a readable safetensors file", tmp_path / "canary")


@pytest.mark.parametrize("cut", ["half", "header", "8bytes", "empty", "huge_header", "garbage_header"])
def test_truncated_or_lying_safetensors_is_a_model_error(tmp_path, trained_cnn, cut):
    from edgecli.errors import ModelFileError
    from edgecli.training import load_weights_file

    f = tmp_path / "w.safetensors"
    f.write_bytes(_cut((trained_cnn.run_dir / "train" / "weights.safetensors").read_bytes(), cut))
    with pytest.raises(ModelFileError, match=r"w.safetensors: not a readable safetensors file") as e:
        load_weights_file(f)
    assert "\n" not in e.value.message


def test_resume_from_a_planted_pickle_checkpoint_is_refused(tmp_path):
    canary = tmp_path / "canary"
    cfg = tiny_config("ck", tmp_path / "art", train={"epochs": 1})
    path = write_config(tmp_path / "c.yaml", cfg)
    ckpt = tmp_path / "art/ck/.checkpoints/train/last.pt"
    ckpt.parent.mkdir(parents=True)
    _evil_torch_zip(ckpt, canary)
    before = snapshot(tmp_path)
    r = cli("train", "-c", str(path), "--resume", cwd=tmp_path)
    assert_user_error(r, 2, "model error", "checkpoint unreadable", "rerun without --resume")
    assert not canary.exists()
    assert _changed(before, snapshot(tmp_path)) <= {"art/ck/.lock"}
    assert not (tmp_path / "art/ck/train").exists()


def test_distill_teacher_pickle_is_refused(tmp_path, trained_cnn, copy_pipeline):
    canary = tmp_path / "canary"
    p = copy_pipeline(trained_cnn)
    evil = _evil_torch_zip(tmp_path / "teacher.pt", canary)
    cfg = dict(p.cfg, compress={"steps": [{"distill": {"teacher": str(evil), "epochs": 1}}]})
    write_config(p.config, cfg)
    before = snapshot(p.dir)
    r = cli("compress", "-c", str(p.config), cwd=p.dir)
    assert_user_error(r, 2, "model error", "refused")
    assert not canary.exists()
    assert _changed(before, snapshot(p.dir)) <= {"artifacts/tiny/.lock"}


def test_weights_swapped_after_publish_fail_verification(tmp_path, trained_cnn, copy_pipeline):
    """A pickle dropped over a published weights file is caught by the manifest hash, never loaded."""
    from edgecli.artifacts import ArtifactStore
    from edgecli.errors import ArtifactError

    canary = tmp_path / "canary"
    p = copy_pipeline(trained_cnn)
    _evil_pickle(p.run_dir / "train" / "weights.safetensors", canary)
    store = ArtifactStore(p.dir / "artifacts", "tiny")
    assert not store.verify("train")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        store.require("train", "weights.safetensors")
    assert not canary.exists()
