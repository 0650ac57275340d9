"""Knowledge distillation: the loss is what it claims, a student learns from the teacher, teachers load."""

from __future__ import annotations

import pytest

from edgecli.compression import TorchContext
from edgecli.config import DistillConfig, PipelineConfig, StudentConfig
from edgecli.errors import ConfigError


def _ctx(p) -> TorchContext:
    from edgecli.data import load_splits
    from edgecli.models import rebuild_pruned
    from edgecli.training import evaluate, load_weights_file

    cfg = PipelineConfig.model_validate(p.cfg)
    info = p.manifest("train")["model_info"]
    model = rebuild_pruned(info, load_weights_file(p.run_dir / "train" / "weights.safetensors"))
    splits = load_splits(cfg)
    val, _ = evaluate(model, splits.val.x, splits.val.y, info["num_classes"])
    return TorchContext(model, splits, cfg, info, info["num_classes"], val["accuracy"], quiet=True,
                        teacher_weights=p.run_dir / "train" / "weights.safetensors")


def test_distill_loss_matches_its_definition():
    import torch
    import torch.nn.functional as F

    from edgecli.compression.distill import make_distill_loss

    torch.manual_seed(0)
    teacher = torch.nn.Linear(5, 4)
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    logits = torch.randn(16, 4)
    t = 3.0
    loss = make_distill_loss(teacher, alpha=0.6, temperature=t)(logits, x, y)
    with torch.no_grad():
        p_t = F.softmax(teacher(x) / t, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / t, -1))).sum(-1).mean() * t * t
    expected = 0.6 * kl + 0.4 * F.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # alpha 0 is the hard-label loss alone; a student equal to its teacher has no soft loss
    assert make_distill_loss(teacher, 0.0, t)(logits, x, y).item() == pytest.approx(F.cross_entropy(logits, y).item())
    with torch.no_grad():
        same = teacher(x)
    assert make_distill_loss(teacher, 1.0, t)(same, x, y).item() == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is frozen


def test_student_from_scratch_learns_from_the_teacher(trained_cnn):
    from edgecli.compression.distill import distill_step
    from edgecli.training import evaluate

    ctx = _ctx(trained_cnn)
    teacher_params = sum(p.numel() for p in ctx.model.parameters())
    opts = DistillConfig(student=StudentConfig(arch="mlp", args={"hidden": [32]}), epochs=4, lr=0.01,
                         alpha=0.7, temperature=4.0)
    d = distill_step(ctx, opts)
    assert type(ctx.model).__name__ == "MLP"
    assert d["params_after"] == sum(p.numel() for p in ctx.model.parameters()) < teacher_params / 5
    assert d["params_before"] == teacher_params
    test, _ = evaluate(ctx.model, ctx.splits.test.x, ctx.splits.test.y, ctx.num_classes)
    assert test["accuracy"] > 0.85
    assert d["val_accuracy_after"] > 0.85 and d["epochs_run"] == 4


def test_teacher_from_a_stage_directory_and_bad_paths(trained_cnn, tmp_path):
    import numpy as np

    from edgecli.compression.distill import load_teacher
    from edgecli.training import predict_logits

    ctx = _ctx(trained_cnn)
    t = load_teacher(ctx, str(trained_cnn.run_dir / "train"))
    x = ctx.splits.val.x[:32]
    np.testing.assert_allclose(predict_logits(t, x), predict_logits(ctx.model, x), atol=1e-5)
    with pytest.raises(ConfigError, match="distill.teacher: no weights"):
        load_teacher(ctx, str(tmp_path / "nowhere"))
    # 'train' without a stage-provided teacher reads this pipeline's train stage
    assert ctx.teacher is None
    t2 = load_teacher(ctx, "train")
    assert ctx.teacher is t2
    np.testing.assert_allclose(predict_logits(t2, x), predict_logits(ctx.model, x), atol=1e-5)


def test_unknown_student_arch_is_a_config_error(trained_cnn):
    from edgecli.compression.distill import distill_step

    ctx = _ctx(trained_cnn)
    with pytest.raises(ConfigError, match="distill.student.arch: unknown model .mpl'.*did you mean 'mlp'"):
        distill_step(ctx, DistillConfig(student=StudentConfig(arch="mpl"), epochs=1))
    with pytest.raises(ConfigError, match="distill.student.args.hiden"):
        distill_step(ctx, DistillConfig(student=StudentConfig(arch="mlp", args={"hiden": [8]}), epochs=1))
