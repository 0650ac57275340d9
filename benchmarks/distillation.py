"""Distillation and pruning goals of issue 4, measured side by side in one run (not a pytest).

1. student: the same student (default resnet8 at width 0.5), same epochs and seed, trained from
   scratch with the hard labels only (alpha 0) and with distillation from the trained model.
2. prune: the trained model pruned 50% (L1 channels) and fine-tuned for the same epochs, without
   and with distillation; params, MACs, accuracy and FP32 ONNX Runtime p50 latency (batch 1,
   1 thread, timed interleaved with the unpruned model) against the goals of issue 4.

Trains the config's model first when its train stage is missing. Exit 1 when a goal is missed.

    .venv/bin/python benchmarks/distillation.py [--config configs/digits-resnet8.yaml]
        [--artifacts /tmp/edgecli-bench/artifacts] [--epochs 10] [--student resnet8 --student-args '{"width": 0.5}']
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {"params_fraction": 0.35, "macs_fraction": 0.35, "accuracy_drop": 0.01, "p50_ratio": 0.85}


def _ctx(cfg, splits, run: Path):
    from edgecli.compression import TorchContext
    from edgecli.models import rebuild_pruned
    from edgecli.training import load_weights_file

    man = json.loads((run / "train" / "manifest.json").read_text())
    info = man["model_info"]
    model = rebuild_pruned(info, load_weights_file(run / "train" / "weights.safetensors"))
    return TorchContext(model, splits, cfg, info, info["num_classes"], float(man["metrics"]["val_accuracy"]),
                        quiet=True, teacher_weights=run / "train" / "weights.safetensors")


def _test_acc(model, splits, n) -> float:
    from edgecli.training import evaluate

    return float(evaluate(model, splits.test.x, splits.test.y, n)[0]["accuracy"])


def _table(title: str, cols: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    w = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(cols)))
    for r in rows:
        print("  ".join(str(v).ljust(w[i]) for i, v in enumerate(r)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits-resnet8.yaml")
    ap.add_argument("--artifacts", default="/tmp/edgecli-bench/artifacts")
    ap.add_argument("--epochs", type=int, default=10, help="student training and prune fine-tuning epochs")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--student-args", default='{"width": 0.5}', help="JSON keyword arguments of the student")
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--ratio", type=float, default=0.5, help="channel pruning ratio")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (interleaved)")
    ap.add_argument("--skip-prune", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import torch

    from edgecli.compression.distill import distill_step
    from edgecli.compression.prune import prune_step
    from edgecli.compression.quantize import time_p50
    from edgecli.config import DistillConfig, PruneConfig, StudentConfig, load_config
    from edgecli.data import load_splits
    from edgecli.onnxio import export_onnx

    cfg = load_config(REPO / args.config, [f"artifacts_dir={args.artifacts}", "compress.max_accuracy_drop=null"])
    run = Path(args.artifacts) / cfg.name
    if not (run / "train" / "manifest.json").is_file():
        print(f"training {cfg.name} into {run} ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "edgecli", "train", "-c", args.config, "-q",
                            "--set", f"artifacts_dir={args.artifacts}"], cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"edgecli train failed ({r.returncode}):\n{r.stderr}")
    splits = load_splits(cfg)
    base = _ctx(cfg, splits, run)
    n = base.num_classes
    teacher_test = _test_acc(base.model, splits, n)
    teacher_params = sum(p.numel() for p in base.model.parameters())
    print(f"{cfg.name}: teacher {cfg.model.arch}, {teacher_params:,} params, val {base.baseline_val_accuracy:.4f}, "
          f"test {teacher_test:.4f}; {args.epochs} epochs per run, seed {cfg.seed}", file=sys.stderr)

    # 1. the same student, from scratch, without and with the teacher
    student = StudentConfig(arch=args.student, args=json.loads(args.student_args))
    rows = []
    for label, alpha in (("hard labels only (alpha 0)", 0.0), (f"distilled (alpha {args.alpha:g}, T {args.temperature:g})", args.alpha)):
        ctx = _ctx(cfg, splits, run)
        print(f"student: {label} ...", file=sys.stderr)
        d = distill_step(ctx, DistillConfig(student=student, epochs=args.epochs, alpha=alpha,
                                            temperature=args.temperature))
        rows.append([label, d["params_after"], f"{d['val_accuracy_after']:.4f}",
                     f"{_test_acc(ctx.model, splits, n):.4f}", d["epochs_run"], d["seconds"]])
    _table(f"student {args.student} {student.args} from scratch, {args.epochs} epochs, seed {cfg.seed} "
           f"(teacher test {teacher_test:.4f})", ["student", "params", "val acc", "test acc", "epochs", "s"], rows)
    if args.skip_prune:
        return 0

    # 2. prune + fine-tune, without and with distillation; FP32 latency against the unpruned model
    ok, checks = True, {}
    with tempfile.TemporaryDirectory() as tmp:
        example = (torch.as_tensor(splits.val.x[:1]),)
        paths = [export_onnx(base.model, example, Path(tmp) / "unpruned.onnx")]
        results = []
        for label, dist in (("fine-tune", None),
                            ("fine-tune + distill", DistillConfig(alpha=args.alpha, temperature=args.temperature))):
            ctx = _ctx(cfg, splits, run)
            print(f"prune {args.ratio:g}: {label} ...", file=sys.stderr)
            d = prune_step(ctx, PruneConfig(ratio=args.ratio, finetune_epochs=args.epochs, distill=dist))
            paths.append(export_onnx(ctx.model, example, Path(tmp) / f"pruned{len(paths)}.onnx"))
            results.append((label, d, _test_acc(ctx.model, splits, n)))
        p50 = time_p50(paths, {"input": splits.val.x[:1]}, 1, rounds=args.rounds)
    rows = [["unpruned", teacher_params, "1.00", "1.00", f"{base.baseline_val_accuracy:.4f}", f"{teacher_test:.4f}",
             "-", f"{p50[0]:.4f}", "1.00"]]
    for (label, d, test), t in zip(results, p50[1:], strict=True):
        drop = teacher_test - test
        rows.append([label, d["params_after"], f"{d['params_fraction']:.2f}", f"{d['macs_fraction']:.2f}",
                     f"{d['val_accuracy_after']:.4f}", f"{test:.4f}", f"{drop:+.4f}", f"{t:.4f}", f"{t / p50[0]:.2f}"])
        if "distill" in label:
            checks = {"params_fraction": d["params_fraction"], "macs_fraction": d["macs_fraction"],
                      "accuracy_drop": max(drop, base.baseline_val_accuracy - d["val_accuracy_after"]),
                      "p50_ratio": t / p50[0]}
    _table(f"prune {args.ratio:g} (l1, uniform) + {args.epochs} epochs; FP32 ONNX Runtime p50 at batch 1, 1 thread "
           "(interleaved)", ["model", "params", "params x", "MACs x", "val acc", "test acc", "test drop", "p50 ms",
                             "p50 x"], rows)
    print("\ngoals (prune + distill):")
    for k, limit in GOALS.items():
        good = checks[k] <= limit
        ok &= good
        print(f"  {k:16s} {checks[k]:.4f} <= {limit:g}  {'ok' if good else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
