"""Hardening, family 7: training that diverges stops at once, names epoch and step, keeps the last good checkpoint.

Two real ways to get a NaN loss: a learning rate of 1e30 (diverges in the first epoch), and a
user model class (``model.arch: "tests.test_hardening_training:PoisonAfter"``, the custom-class
path users take) whose logits turn NaN after a set number of training steps, so the divergence
falls in a later epoch and a checkpoint of the epochs before exists.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.conftest import cli, tiny_config, write_config
from tests.test_hardening_config import assert_user_error, snapshot


class PoisonAfter(nn.Module):
    """A linear classifier whose training-mode logits become NaN after ``after_steps`` forward passes."""

    def __init__(self, input_shape, num_classes, after_steps: int = 40):
        super().__init__()
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(math.prod(input_shape), num_classes)
        self.after_steps = after_steps
        self.steps = 0

    def forward(self, x):
        out = self.classifier(self.flatten(x))
        if self.training:
            self.steps += 1
            if self.steps > self.after_steps:
                out = out * float("nan")
        return out


def test_huge_learning_rate_stops_in_epoch_one_and_publishes_nothing(tmp_path):
    cfg = tiny_config("nan", tmp_path / "art", train={"epochs": 3, "batch_size": 64, "lr": 1e30})
    path = write_config(tmp_path / "c.yaml", cfg)
    before = snapshot(tmp_path)
    r = cli("train", "-c", str(path), "--json", cwd=tmp_path)
    (line,) = assert_user_error(r, 1, "training diverged", "loss became nan at epoch 1, step ",
                                "no epoch completed, so no checkpoint was kept")
    assert r.stdout == ""
    assert "lower train.lr" in r.stderr  # the hint names the fix
    after = snapshot(tmp_path)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} <= {"art", "art/nan", "art/nan/.lock"}


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path):
    # digits: 1079 training samples, batch 64 -> 17 steps an epoch; NaN from step 41 = epoch 3, step 7
    cfg = tiny_config("nan", tmp_path / "art", model={"arch": "tests.test_hardening_training:PoisonAfter",
                                                       "args": {"after_steps": 40}},
                      train={"epochs": 5, "batch_size": 64, "lr": 0.01, "scheduler": "none"})
    path = write_config(tmp_path / "c.yaml", cfg)
    r = cli("train", "-c", str(path), cwd=tmp_path)
    ckpt_dir = tmp_path / "art/nan/.checkpoints/train"
    assert_user_error(r, 1, "training diverged",
                      f"loss became nan at epoch 3, step 7; the last good checkpoint (epoch 2) is kept in {ckpt_dir}")
    assert "train nan: epoch 2/5" in r.stderr  # two epochs did finish
    assert not (tmp_path / "art/nan/train").exists()
    assert not [p for p in (tmp_path / "art/nan").iterdir() if ".tmp-" in p.name]
    ck = torch.load(str(ckpt_dir / "last.pt"), map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and [h["epoch"] for h in ck["history"]] == [1, 2]
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert ck["history"][-1]["val_accuracy"] > 0.5  # the kept weights are good ones, not the poisoned step's

