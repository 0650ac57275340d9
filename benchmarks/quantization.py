"""Quantization goals of issue 3, measured side by side in one run (not a pytest).

For configs/digits-resnet8.yaml (mode static) and configs/digits-mobilenet.yaml (mode auto):
train when artifacts are missing, run `edgecli compress`, then time the FP32 train model and the
published compress model interleaved (batch 1, 1 thread) and score both on the validation split.

    .venv/bin/python benchmarks/quantization.py [--artifacts /tmp/edgecli-bench] [--force]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "configs/digits-resnet8.yaml": {"size_ratio": 0.35, "accuracy_drop": 0.01, "p50_ratio": 0.80},
    "configs/digits-mobilenet.yaml": {"p50_ratio": 1.05},
}


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "edgecli", *args, "-q"], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"edgecli {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="/tmp/edgecli-bench/artifacts")
    ap.add_argument("--force", action="store_true", help="rerun compress even when up to date")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from edgecli.compression.quantize import Scorer, time_p50
    from edgecli.config import load_config
    from edgecli.data import load_splits
    from edgecli.onnxio import model_bytes

    rows, ok = [], True
    for cfg_path, goals in CONFIGS.items():
        sets = ["--set", f"artifacts_dir={args.artifacts}"]
        cfg = load_config(REPO / cfg_path, [f"artifacts_dir={args.artifacts}"])
        run = Path(args.artifacts) / cfg.name
        if not (run / "train" / "manifest.json").is_file():
            print(f"training {cfg.name} into {run} ...", file=sys.stderr)
            _cli("train", "-c", cfg_path, *sets)
        _cli("compress", "-c", cfg_path, *sets, *(["--force"] if args.force else []))
        fp32, chosen = run / "train" / "model.onnx", run / "compress" / "model.onnx"
        sp = load_splits(cfg)
        feeds = {"input": sp.val.x}
        sc = Scorer(feeds, sp.val.y, 1)
        a0, a1 = sc.score(fp32)["score"], sc.score(chosen)["score"]
        t0, t1 = time_p50([fp32, chosen], {"input": sp.val.x[:1]}, 1, rounds=args.rounds)
        b0, b1 = model_bytes(fp32), model_bytes(chosen)
        rep = json.loads((run / "compress" / "report.json").read_text())
        got = {"p50_ratio": t1 / t0, "size_ratio": b1 / b0, "accuracy_drop": a0 - a1}
        checks = [f"{k} {got[k]:.3f} <= {v}" + ("" if got[k] <= v + 1e-9 else " FAILED") for k, v in goals.items()]
        ok &= all("FAILED" not in c for c in checks)
        rows.append((cfg.name, rep["steps"][-1].get("chosen") or "kept FP32", t0, t1, got, checks))

    print(f"{'config':<18} {'chosen':<24} {'fp32 p50':>9} {'chosen p50':>10} {'p50 ratio':>9} {'size ratio':>10} "
          f"{'acc drop':>9}  goals")
    for name, ch, t0, t1, got, checks in rows:
        print(f"{name:<18} {ch:<24} {t0:9.4f} {t1:10.4f} {got['p50_ratio']:9.3f} {got['size_ratio']:10.3f} "
              f"{got['accuracy_drop']:9.4f}  {'; '.join(checks)}")
    print("batch 1, 1 thread, ms; accuracy on the validation split; timings interleaved in this one run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
