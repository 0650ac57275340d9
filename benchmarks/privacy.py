"""Accuracy under privacy: DP-SGD and federated training against their non-private, centralised runs.

    .venv/bin/python benchmarks/privacy.py            # both comparisons (several minutes on 2 vCPUs)
    .venv/bin/python benchmarks/privacy.py --only dp  # or: --only federated

Every run trains through edgecli's own train stage (in-process, fixed seeds, one torch thread so a
busy shared machine does not slow it 20x) into a temporary artifacts directory, and prints the
test accuracy, ε where there is one, and whether the issue's goal holds:

- DP-SGD (configs/digits-cnn-dp.yaml, ε <= 8 at δ = 1e-5) within 5 points of the same config
  without ``train.privacy`` (the same model with its BatchNorm, the same optimiser and epochs);
- federated (configs/digits-cnn-federated.yaml, 10 Dirichlet(0.5) clients, 20 rounds) within 3
  points of centralised training (configs/digits-cnn.yaml).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return " ".join(sorted(set(re.findall(r"avx2|avx512_vnni|avx512_bf16|amx[a-z_]*", out)))) or "none of avx2/avx512/amx"


def train(config: str, overrides: list[str], artifacts: Path) -> dict:
    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.stages import train as train_stage

    cfg = load_config(REPO / config, [f"artifacts_dir={artifacts}", *overrides])
    t0 = time.time()
    res = train_stage.run(cfg, ArtifactStore(cfg.artifacts_dir, cfg.name), force=True, quiet=True)
    m = res.metrics
    return {"test": m["test_accuracy"], "val": m["val_accuracy"], "epsilon": m.get("epsilon"),
            "seconds": time.time() - t0}


def show(label: str, r: dict) -> None:
    eps = f"  ε {r['epsilon']:.3f} (δ 1e-5)" if r.get("epsilon") is not None else ""
    print(f"  {label:<46} test acc {r['test']:.4f}  val acc {r['val']:.4f}{eps}  ({r['seconds']:.0f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["dp", "federated"])
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, 1 thread")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp)
        if args.only in (None, "dp"):
            print("DP-SGD (Opacus) vs the same config without train.privacy:")
            dp = train("configs/digits-cnn-dp.yaml", [], art)
            show("configs/digits-cnn-dp.yaml (DP-SGD)", dp)
            plain = train("configs/digits-cnn-dp.yaml", ["train.privacy=null", "name=digits-cnn-dp-plain"], art)
            show("same, train.privacy=null", plain)
            gap = plain["test"] - dp["test"]
            held = dp["epsilon"] <= 8.0 + 1e-6 and gap <= 0.05
            ok &= held
            print(f"  -> ε {dp['epsilon']:.3f} <= 8 and {100 * gap:.1f} points below the non-private run "
                  f"(goal: within 5): {'holds' if held else 'DOES NOT HOLD'}")
        if args.only in (None, "federated"):
            print("federated (Flower FedAvg, 10 Dirichlet(0.5) clients, 20 rounds) vs centralised:")
            fed = train("configs/digits-cnn-federated.yaml", [], art)
            show("configs/digits-cnn-federated.yaml", fed)
            cen = train("configs/digits-cnn.yaml", [], art)
            show("configs/digits-cnn.yaml (centralised)", cen)
            gap = cen["test"] - fed["test"]
            held = gap <= 0.03
            ok &= held
            print(f"  -> {100 * gap:.1f} points below centralised (goal: within 3): {'holds' if held else 'DOES NOT HOLD'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
