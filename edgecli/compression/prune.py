"""Structural channel pruning (torch-pruning) and unstructured magnitude sparsity.

Channel pruning removes whole filters through torch-pruning's dependency graph, so residual
additions and depthwise convolutions stay consistent and the network really gets smaller and
faster on dense CPU kernels. Unstructured sparsity only zeroes weights: the tensors keep
their shapes, so it shrinks a *compressed* file but never speeds up a dense runtime.

A pruned model no longer matches its registry definition; ``edgecli.models.rebuild_pruned``
rebuilds one from the model info and a state dict (the shapes are read from the tensors).
"""

from __future__ import annotations

import copy
import math
import time

from edgecli.errors import CheckFailed, ConfigError


def conv_channels(model) -> dict[str, tuple[int, int]]:
    """(in, out) channels of every convolution, by module name."""
    from torch import nn

    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)}


def count_params_macs(model, example) -> tuple[int, int]:
    """(parameters, conv + linear multiply-accumulates at batch 1), counted as the compress stage counts them."""
    from edgecli.models.zoo import count_macs, count_params

    return int(count_params(model)), int(count_macs(model, list(example.shape[1:])))


# --------------------------------------------------------------------------- channel pruning


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
    }[name]()


def _ignored(model, names: list[str] | None) -> list:
    """Modules kept whole: the named ones, by default the model's ``classifier`` (its output layer)."""
    from torch import nn

    from edgecli.registry import did_you_mean

    mods = dict(model.named_modules())
    if names is None:
        if isinstance(getattr(model, "classifier", None), nn.Module):
            return [model.classifier]
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise ConfigError("prune.ignore: the model has no 'classifier' attribute and no Linear layer; "
                              "name its output layer in prune.ignore")
        return [heads[-1]]
    out = []
    for n in names:
        if n not in mods or not n:
            tops = [k for k in mods if k]
            raise ConfigError(f"prune.ignore: no module named '{n}'{did_you_mean(n, tops)}")
        out.append(mods[n])
    return out


def _taylor_grads(model, ctx, loss_fn, batches: int = 4) -> None:
    """Accumulate gradients on a few training batches (Taylor importance is |w * dL/dw|)."""
    import torch

    x, y = ctx.splits.train.x, ctx.splits.train.y
    bs = ctx.cfg.train.batch_size
    g = torch.Generator().manual_seed(ctx.cfg.seed)
    order = torch.randperm(len(y), generator=g).numpy()
    model.train()
    model.zero_grad(set_to_none=True)
    for i in range(batches):
        idx = order[i * bs:(i + 1) * bs]
        if len(idx) == 0:
            break
        xb, yb = torch.as_tensor(x[idx]), torch.as_tensor(y[idx])
        loss_fn(model(xb), xb, yb).backward()
    model.eval()


def _make_pruner(model, example, opts, channel_ratio: float, ignore):
    import torch_pruning as tp

    return tp.pruner.BasePruner(
        model, example, importance=_importance(opts.importance), pruning_ratio=channel_ratio,
        global_pruning=opts.global_pruning, iterative_steps=opts.iterative_steps,
        ignored_layers=ignore, round_to=opts.round_to,
        # a global ranking may otherwise empty a whole layer and cut the network in two
        max_pruning_ratio=0.9 if opts.global_pruning else 1.0,
    )


def _prune_copy(model, example, opts, channel_ratio: float, ctx, loss_fn):
    """A pruned copy (all iterative steps at once, no fine-tuning): used to search channel ratios."""
    m = copy.deepcopy(model)
    pruner = _make_pruner(m, example, opts, channel_ratio, _ignored(m, opts.ignore))
    for _ in range(opts.iterative_steps):
        if opts.importance == "taylor":
            _taylor_grads(m, ctx, loss_fn)
        pruner.step()
    m.zero_grad(set_to_none=True)
    return m


def _channel_ratio_for(model, example, opts, target: float, base: tuple[int, int], ctx, loss_fn) -> tuple[float, float]:
    """The smallest channel ratio whose pruned copy removes ``target`` of params (or MACs).

    Returns (channel ratio, fraction removed). When no ratio up to 0.9 reaches the target (round_to
    can forbid the last channels), the ratio that removed the most.
    """
    which = 0 if opts.target == "params" else 1
    seen: dict[float, float] = {}

    def removed(c: float) -> float:
        if c not in seen:
            counts = count_params_macs(_prune_copy(model, example, opts, c, ctx, loss_fn), example)
            seen[c] = 1.0 - counts[which] / base[which]
        return seen[c]

    # removed fraction of params/MACs grows about like 1 - (1 - c)^2: start near that, then widen
    lo, hi = 0.0, min(0.9, max(0.01, 1.0 - math.sqrt(1.0 - target)))
    while removed(hi) < target:
        if hi >= 0.9:
            best = max(seen, key=seen.get)
            return best, seen[best]
        lo, hi = hi, min(0.9, hi + (1.0 - hi) / 2)
    for _ in range(7):
        if hi - lo < 0.005:
            break
        mid = (lo + hi) / 2
        if removed(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, removed(hi)


def _finetune(model, ctx, opts, epochs: int, loss_fn, desc: str):
    import torch

    from edgecli.training import fit

    if epochs <= 0:
        return None
    cfg = ctx.cfg
    return fit(model, ctx.splits.train.x, ctx.splits.train.y, ctx.splits.val.x, ctx.splits.val.y, cfg.train,
               num_classes=ctx.num_classes, seed=cfg.seed, epochs=epochs, lr=getattr(opts, "lr", None) or cfg.train.lr,
               loss_fn=loss_fn, desc=desc, quiet=ctx.quiet, device=torch.device("cpu"))


def _try(ctx, opts, original, example, ratio: float, base: tuple[int, int], loss_fn) -> tuple[object, dict]:
    """Prune a copy of ``original`` to ``ratio`` (of channels, params or MACs) and fine-tune it."""
    from edgecli.training import val_accuracy

    t0 = time.time()
    search_removed = None
    if opts.target == "ratio":
        channel_ratio = ratio
    else:
        channel_ratio, search_removed = _channel_ratio_for(original, example, opts, ratio, base, ctx, loss_fn)
    model = copy.deepcopy(original)
    pruner = _make_pruner(model, example, opts, channel_ratio, _ignored(model, opts.ignore))
    steps = opts.iterative_steps
    per_step = [opts.finetune_epochs // steps + (1 if i < opts.finetune_epochs % steps else 0) for i in range(steps)]
    acc_pruned = None
    epochs_run = 0
    for i in range(steps):
        if opts.importance == "taylor":
            _taylor_grads(model, ctx, loss_fn)
        pruner.step()
        model.zero_grad(set_to_none=True)
        if i == 0:
            acc_pruned = val_accuracy(model, ctx)
        res = _finetune(model, ctx, opts, per_step[i], loss_fn,
                        "prune fine-tune" if steps == 1 else f"prune fine-tune {i + 1}/{steps}")
        epochs_run += res.epochs_run if res else 0
    model.eval()
    with_out = model(example)
    if tuple(with_out.shape) != (1, ctx.num_classes):
        raise CheckFailed(f"prune: pruning changed the output to {tuple(with_out.shape)}; "
                          "add the output layer to prune.ignore")
    params, macs = count_params_macs(model, example)
    if params >= base[0] and (opts.round_to or 1) > 1:
        # a small ratio rounded to multiples of round_to can keep every channel: prune without rounding
        model, info = _try(ctx, opts.model_copy(update={"round_to": None}), original, example, ratio, base, loss_fn)
        info["round_to"] = f"none (round_to {opts.round_to} kept every channel at ratio {ratio:.4g})"
        return model, info
    if params >= base[0]:
        raise ConfigError(f"prune: importance '{opts.importance}' removed no channel (nothing it can rank: "
                          "bn_scale needs BatchNorm layers); use l1 or l2")
    acc = val_accuracy(model, ctx)
    drop = ctx.baseline_val_accuracy - acc
    limit = ctx.cfg.compress.max_accuracy_drop
    info = {
        "ratio": round(ratio, 4), "channel_ratio": round(channel_ratio, 4),
        "params": params, "macs": macs,
        "params_removed": round(1 - params / base[0], 4), "macs_removed": round(1 - macs / base[1], 4),
        "val_accuracy_pruned": acc_pruned, "val_accuracy": acc, "accuracy_drop": round(drop, 4),
        "passed": limit is None or drop <= limit + 1e-9, "finetune_epochs_run": epochs_run,
        "seconds": round(time.time() - t0, 2),
    }
    if search_removed is not None:
        info["search_removed"] = round(search_removed, 4)
    return model, info


def prune_step(ctx, opts) -> dict:
    """Channel-prune ``ctx.model`` (dependency-graph aware), fine-tune, back off on accuracy.

    Tries ``opts.ratio`` first; while the fine-tuned candidate misses compress.max_accuracy_drop,
    bisects between the last passing ratio (0 at first: halve the ratio) and the last failing one,
    within ``opts.max_tries``. Leaves the best candidate in ``ctx.model``: the most pruned one
    that passes, else the most accurate one, with the failed constraint named in the details.
    """
    import torch

    from edgecli.compression.distill import load_teacher, make_distill_loss
    from edgecli.training import hard_label_loss, val_accuracy

    if isinstance(ctx.splits.train.x, dict) or ctx.model_info.get("kind") == "text":
        raise ConfigError("prune: text models are not supported (image and feature models only)")
    t0 = time.time()
    original = ctx.model.cpu().eval()
    if ctx.teacher is None:
        # the unpruned model is the default teacher for this and later distillation steps
        ctx.teacher = copy.deepcopy(original).eval()
    example = torch.as_tensor(ctx.splits.train.x[:1])
    base = count_params_macs(original, example)
    base_channels = conv_channels(original)
    ce = hard_label_loss(ctx.cfg, ctx.splits.train.y, ctx.num_classes)
    if opts.distill is not None:
        teacher = load_teacher(ctx, opts.distill.teacher)
        loss_fn = make_distill_loss(teacher, opts.distill.alpha, opts.distill.temperature, ce)
    else:
        def loss_fn(logits, xb, yb):
            return ce(logits, yb)

    limit = ctx.cfg.compress.max_accuracy_drop
    input_acc = val_accuracy(original, ctx)
    tries: list[dict] = []
    best, best_info = None, None
    ok_ratio, bad_ratio = 0.0, None
    ratio = opts.ratio
    for n in range(opts.max_tries if limit is not None else 1):
        model, info = _try(ctx, opts, original, example, ratio, base, loss_fn)
        info["try"] = n + 1
        tries.append(info)
        if info["passed"]:
            if best_info is None or not best_info["passed"] or info["ratio"] > best_info["ratio"]:
                best, best_info = model, info
            ok_ratio = ratio
            if bad_ratio is None:
                break  # the requested ratio holds: nothing to back off from
        else:
            if best_info is None or (not best_info["passed"] and info["val_accuracy"] > best_info["val_accuracy"]):
                best, best_info = model, info
            bad_ratio = ratio
        nxt = (ok_ratio + bad_ratio) / 2
        if abs(nxt - ratio) < 0.01 or nxt <= 0.005:
            break
        ratio = nxt

    failed, backed_off = None, None
    if not best_info["passed"]:
        failed = (f"max_accuracy_drop: every try lost more than {limit:g} validation accuracy "
                  f"(best {best_info['accuracy_drop']:.4f} at ratio {best_info['ratio']:g}); kept the most accurate")
    elif best_info["ratio"] < opts.ratio:  # a backed-off ratio that holds is a success, not a failed constraint
        backed_off = (f"ratio {opts.ratio:g} lost {tries[0]['accuracy_drop']:.4f} > max_accuracy_drop {limit:g}; "
                      f"backed off to {best_info['ratio']:g}, which holds")
    if best_info.get("search_removed") is not None and best_info["search_removed"] < best_info["ratio"] - 1e-9:
        failed = ((failed + "; ") if failed else "") + (
            f"target: no channel ratio up to 0.9 removes {best_info['ratio']:g} of {opts.target} "
            f"(at most {best_info['search_removed']:.4f}; round_to and ignored layers limit it)")
    ctx.model = best.eval()
    params, macs = best_info["params"], best_info["macs"]
    after_channels = conv_channels(best)
    ctx.notes.append(
        f"prune: {opts.importance} {'global' if opts.global_pruning else 'uniform'} ratio {best_info['ratio']:g} "
        f"({opts.target}): params {base[0]:,} -> {params:,} ({params / base[0]:.0%}), MACs {base[1]:,} -> {macs:,} "
        f"({macs / base[1]:.0%}), val accuracy {input_acc:.4f} -> {best_info['val_accuracy']:.4f}"
        + (f"; {failed}" if failed else "") + (f"; {backed_off}" if backed_off else "")
    )
    return {
        "method": "prune", "importance": opts.importance, "scope": "global" if opts.global_pruning else "uniform",
        "target": opts.target, "ratio_requested": opts.ratio, "ratio_achieved": best_info["ratio"],
        "channel_ratio": best_info["channel_ratio"], "iterative_steps": opts.iterative_steps,
        "ignored": opts.ignore if opts.ignore is not None else ["classifier"],
        "distill": opts.distill.model_dump() if opts.distill else None,
        "finetune_epochs": opts.finetune_epochs, "lr": opts.lr or ctx.cfg.train.lr,
        "params_before": base[0], "params_after": params, "macs_before": base[1], "macs_after": macs,
        "params_fraction": round(params / base[0], 4), "macs_fraction": round(macs / base[1], 4),
        "val_accuracy_before": input_acc, "val_accuracy_after": best_info["val_accuracy"],
        "max_accuracy_drop": limit, "failed_constraint": failed, "backed_off": backed_off, "tries": tries,
        "round_to": opts.round_to,
        "conv_channels": {k: {"before": list(base_channels[k]), "after": list(after_channels.get(k, ()))}
                          for k in base_channels},
        "seconds": round(time.time() - t0, 2),
    }


# --------------------------------------------------------------------------- unstructured sparsity


def _compressed_bytes(model, example) -> tuple[int, int]:
    """(ONNX bytes, the same file deflated with zlib level 9) of ``model`` exported to a temp dir."""
    import zlib
    from pathlib import Path

    from edgecli.onnxio import export_onnx
    from edgecli.safeio import temp_dir

    with temp_dir("sparsity") as d:
        p = export_onnx(copy.deepcopy(model).eval(), (example,), Path(d) / "m.onnx")
        data = p.read_bytes()
    return len(data), len(zlib.compress(data, 9))


def sparsity_step(ctx, opts) -> dict:
    """Zero the smallest-magnitude weights of every conv/linear layer (global ranking), optionally fine-tune.

    The benefit is size after compression (zip, OTA update payloads); the tensors stay dense,
    so ONNX Runtime's CPU kernels run exactly as many multiply-adds as before.
    """
    import torch
    import torch.nn.utils.prune as tprune
    from torch import nn

    from edgecli.training import hard_label_loss, val_accuracy

    if isinstance(ctx.splits.train.x, dict):
        raise ConfigError("sparsity: text models are not supported (image and feature models only)")
    t0 = time.time()
    model = ctx.model.cpu().eval()
    if ctx.teacher is None:
        ctx.teacher = copy.deepcopy(model).eval()
    example = torch.as_tensor(ctx.splits.train.x[:1])
    input_acc = val_accuracy(model, ctx)
    bytes_before, deflated_before = _compressed_bytes(model, example)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if not targets:
        raise ConfigError("sparsity: the model has no conv or linear layer to sparsify")
    total = sum(m.weight.numel() for m, _ in targets)
    tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=opts.ratio)
    acc_sparse = val_accuracy(model, ctx)
    epochs_run = 0
    if opts.finetune_epochs > 0:
        ce = hard_label_loss(ctx.cfg, ctx.splits.train.y, ctx.num_classes)
        # the masks stay attached during fine-tuning, so pruned weights remain zero
        res = _finetune(model, ctx, opts, opts.finetune_epochs, lambda lg, xb, yb: ce(lg, yb), "sparsity fine-tune")
        epochs_run = res.epochs_run
    for m, name in targets:
        tprune.remove(m, name)
    model.eval()
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    acc = val_accuracy(model, ctx)
    bytes_after, deflated_after = _compressed_bytes(model, example)
    ctx.model = model
    ctx.notes.append(f"sparsity: {zeros / total:.0%} of conv/linear weights are zero; deflated ONNX "
                     f"{deflated_before:,} -> {deflated_after:,} bytes; no speed-up on dense CPU kernels")
    return {
        "method": "sparsity", "ratio_requested": opts.ratio, "ratio_achieved": round(zeros / total, 4),
        "weights_zeroed": zeros, "weights_total": total,
        "onnx_bytes_before": bytes_before, "onnx_bytes_after": bytes_after,
        "deflated_bytes_before": deflated_before, "deflated_bytes_after": deflated_after,
        "val_accuracy_before": input_acc, "val_accuracy_sparse": acc_sparse, "val_accuracy_after": acc,
        "finetune_epochs": opts.finetune_epochs, "finetune_epochs_run": epochs_run,
        "speedup": "none: the weights stay dense tensors, so ONNX Runtime's CPU kernels do the same "
                   "multiply-adds; the benefit is the size after compression (zip/deflate) only",
        "seconds": round(time.time() - t0, 2),
    }
