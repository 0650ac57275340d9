"""Knowledge distillation: soft targets at temperature T from a teacher, plus the hard-label loss.

Used two ways: inside prune's fine-tuning (``prune: {distill: {...}}``) through
``make_distill_loss``, and as a step of its own (``distill_step``) that either trains a
registry ``student`` from scratch against the teacher, or keeps training the current
(e.g. pruned) model against it. Both go through the one training loop, ``edgecli.training.fit``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from edgecli.errors import ConfigError, ModelFileError


def make_distill_loss(teacher, alpha: float, temperature: float, ce=None):
    """A ``loss_fn(logits, xb, yb)`` for ``fit``: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * ce.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    when T changes (Hinton et al. 2015). ``ce(logits, yb)`` defaults to plain cross-entropy;
    pass the train config's (class weights, label smoothing) to keep training semantics.
    """
    import torch
    import torch.nn.functional as F

    if ce is None:
        ce = torch.nn.CrossEntropyLoss()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t = float(temperature)
    a = float(alpha)

    def loss_fn(logits, xb, yb):
        with torch.no_grad():
            dev = logits.device
            if next(teacher.parameters()).device != dev:
                teacher.to(dev)
            t_logits = (teacher(**xb) if isinstance(xb, dict) else teacher(xb)).float()
        hard = ce(logits, yb)
        if a == 0.0:
            return hard
        soft = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(t_logits / t, dim=-1),
                        reduction="batchmean", log_target=True) * (t * t)
        return a * soft + (1.0 - a) * hard

    return loss_fn


def _weights_and_info(ref: Path, model_info: dict, trusted: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A teacher reference (weights file, stage directory or run directory) -> (weights, model_info).

    A teacher directory's manifest names an architecture: it is built only when the config names it
    too (``trusted``) or it is a registry name; a manifest never chooses which code is imported.
    """
    import json

    from edgecli.models import trusted_info

    cands = [(ref, None), (ref / "weights.safetensors", ref / "manifest.json"),
             (ref / "train" / "weights.safetensors", ref / "train" / "manifest.json")]
    for w, man in cands:
        if w.is_file():
            info = model_info
            if man is not None and man.is_file():
                try:
                    data = json.loads(man.read_text())
                except (OSError, ValueError, RecursionError):
                    raise ModelFileError(f"{man}: unreadable manifest") from None
                if not isinstance(data, dict):
                    raise ModelFileError(f"{man}: not an edgecli manifest (not a JSON object)")
                if data.get("model_info"):
                    info = trusted_info(data["model_info"], trusted, str(man))
            return w, info
    raise ConfigError(f"distill.teacher: no weights at {ref} (give 'train', a .safetensors file or a train stage directory)")


def load_teacher(ctx, ref: str = "train"):
    """The teacher network (eval mode, frozen), cached on ``ctx.teacher`` for 'train'.

    'train' is the trained model of this pipeline: ``ctx.teacher`` when the stage (or an earlier
    step, before changing the model) set it, else the train stage's weights the stage resolved
    (``ctx.teacher_weights``), else a copy of ``ctx.model``. A path names a weights file (this pipeline's architecture) or a train stage /
    run directory (its own architecture, from its manifest).
    """
    from edgecli.models import rebuild_pruned
    from edgecli.training import load_weights_file

    if ref == "train":
        if ctx.teacher is None:
            w = ctx.teacher_weights
            if w is not None and Path(w).is_file():
                ctx.teacher = rebuild_pruned(ctx.model_info, load_weights_file(w))
            else:
                ctx.teacher = copy.deepcopy(ctx.model)
        teacher = ctx.teacher
    else:
        from edgecli.models import trusted_archs

        w, info = _weights_and_info(Path(ref).expanduser(), ctx.model_info, trusted_archs(ctx.cfg))
        teacher = rebuild_pruned(info, load_weights_file(w))
        if int(info.get("num_classes", ctx.num_classes)) != int(ctx.num_classes):
            raise ConfigError(f"distill.teacher: {w} predicts {info.get('num_classes')} classes, "
                              f"this pipeline {ctx.num_classes}")
    teacher = teacher.cpu().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_step(ctx, opts) -> dict:
    """Train ``opts.student`` from scratch against the teacher, or (no student) keep training ctx.model.

    Replaces ``ctx.model`` with the result and returns the step's details.
    """
    import torch

    from edgecli.models import build_model
    from edgecli.models.zoo import count_params
    from edgecli.training import fit, hard_label_loss, seed_everything, val_accuracy

    if isinstance(ctx.splits.train.x, dict):
        raise ConfigError("distill: text models are not supported (image and feature models only)")
    t0 = time.time()
    teacher = load_teacher(ctx, opts.teacher)
    cfg = ctx.cfg
    before_params = count_params(ctx.model)
    teacher_acc = val_accuracy(teacher, ctx)
    if opts.student is not None:
        from edgecli.models import MODELS

        try:
            MODELS.check(opts.student.arch)
        except ConfigError as e:  # name the key the user wrote, not model.arch
            raise ConfigError(e.message.replace("model.arch:", "distill.student.arch:", 1)) from None
        seed_everything(cfg.seed, cfg.train.deterministic)
        student = build_model(opts.student.arch, ctx.model_info["input_shape"], ctx.num_classes,
                              opts.student.args, key="distill.student")
        mode = f"student {opts.student.arch} trained from scratch"
    else:
        student = ctx.model
        mode = "current model trained further"
    input_acc = val_accuracy(ctx.model, ctx)
    loss = make_distill_loss(teacher, opts.alpha, opts.temperature,
                             hard_label_loss(cfg, ctx.splits.train.y, ctx.num_classes))
    res = fit(student, ctx.splits.train.x, ctx.splits.train.y, ctx.splits.val.x, ctx.splits.val.y, cfg.train,
              num_classes=ctx.num_classes, seed=cfg.seed, epochs=opts.epochs, lr=opts.lr or cfg.train.lr,
              loss_fn=loss, desc="distill", quiet=ctx.quiet, device=torch.device("cpu"))
    student.eval()
    acc = val_accuracy(student, ctx)
    ctx.model = student
    ctx.notes.append(f"distill: {mode} against the teacher (T={opts.temperature:g}, alpha={opts.alpha:g}), "
                     f"{res.epochs_run} epochs, val accuracy {acc:.4f} (teacher {teacher_acc:.4f})")
    return {
        "method": "distill", "mode": mode, "teacher": opts.teacher, "alpha": opts.alpha,
        "temperature": opts.temperature, "epochs": opts.epochs, "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch, "lr": opts.lr or cfg.train.lr,
        "student": opts.student.model_dump() if opts.student else None,
        "params_before": before_params, "params_after": count_params(student),
        "teacher_val_accuracy": teacher_acc, "val_accuracy_before": input_acc, "val_accuracy_after": acc,
        "seconds": round(time.time() - t0, 2),
    }
