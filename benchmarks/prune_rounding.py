"""Does rounding pruned channel counts to multiples of 8 keep a pruned model faster? Side by side.

The issue-12 case: a 37.5% channel prune made a residual CNN *slower* (0.1017 -> 0.1166 ms), because
odd channel counts (10, 20, 40 of 16, 32, 64) miss the kernels' vector widths. For ResNet-8 at
3x32x32 (BatchNorm statistics calibrated on random inputs; latency does not depend on the
weights' values) this prunes with edgecli's own pruner (torch-pruning, L1, uniform) at
``--ratio`` with ``round_to`` None and 8, exports each, and times the three ONNX models with
compress's latency check, i.e. bench's protocol (the bench worker, fresh processes, interleaved,
timed runs pooled), batch 1, 1 thread. Prints channel counts, p50s and ratios to the unpruned model.

    .venv/bin/python benchmarks/prune_rounding.py [--ratio 0.375] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.375)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    from edgecli.compression.confirm import bench_p50
    from edgecli.compression.prune import _prune_copy, conv_channels
    from edgecli.config import PruneConfig
    from edgecli.models.zoo import ResNet8
    from edgecli.onnxio import export_onnx

    torch.manual_seed(0)
    base = ResNet8([3, 32, 32], 10).train()
    with torch.no_grad():
        for _ in range(10):
            base(torch.randn(32, 3, 32, 32))
    base.eval()
    example = torch.randn(1, 3, 32, 32)
    models = {"unpruned": base}
    for rt in (None, 8):
        opts = PruneConfig(ratio=args.ratio, round_to=rt, finetune_epochs=0)
        models[f"pruned {args.ratio:g}, round_to {rt}"] = _prune_copy(base, example, opts, args.ratio, None, None).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i, (name, m) in enumerate(models.items()):
            p = tmp / f"m{i}.onnx"
            export_onnx(m, (example,), p, opset=17)
            paths.append(p)
            chans = sorted({c for _, (_, c) in conv_channels(m).items()})
            print(f"{name:32s} conv output channels {chans}")
        times = bench_p50(paths, {"input": example.numpy().astype(np.float32)}, 1, repeats=args.repeats, tmp=tmp)
    p0 = times[0]["p50_ms"]
    print(f"\nbench protocol: {args.repeats} fresh processes per model, interleaved, pooled; batch 1, 1 thread")
    for name, t in zip(models, times, strict=True):
        pp = ", ".join(f"{x:.4f}" for x in t["p50_per_process_ms"])
        print(f"{name:32s} p50 {t['p50_ms']:.4f} ms  {t['p50_ms'] / p0:.3f}x unpruned   (per process: {pp})")
    r_none, r_8 = times[1]["p50_ms"] / p0, times[2]["p50_ms"] / p0
    print(f"\nround_to 8 vs none: {times[2]['p50_ms'] / times[1]['p50_ms']:.3f}x "
          f"({'faster' if r_8 < r_none else 'not faster'}); round_to 8 vs unpruned: {r_8:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
