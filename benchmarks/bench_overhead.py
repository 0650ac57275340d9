"""Does `edgecli bench` report what a bare ONNX Runtime loop measures? Ratio of p50s, side by side.

For one model, thread count and batch size, alternately runs

  A. `edgecli bench` (fresh worker process, its p50 from --json), and
  B. a bare, minimal timing loop in a fresh Python process: InferenceSession with the same
     intra-op threads, warm-up, perf_counter_ns around sess.run, median,

``--repeats`` times, swapping the order every repeat (ABBA...) so that a drift in the load of
this shared machine hits both sides alike. Prints every pair, then the ratio of the medians
(edgecli / bare); the goal is 0.9-1.1 and the script exits 1 outside it.

    .venv/bin/python benchmarks/bench_overhead.py                      # trains a tiny digits CNN in a temp dir
    .venv/bin/python benchmarks/bench_overhead.py -c configs/digits-cnn.yaml --model export
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BARE = r"""
import sys, time
import numpy as np
import onnxruntime as ort

path, threads, batch, warmup, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
for _ in range(warmup):
    sess.run(None, feed)
ts = []
for _ in range(runs):
    t0 = time.perf_counter_ns()
    sess.run(None, feed)
    ts.append(time.perf_counter_ns() - t0)
print(float(np.median(ts)) / 1e6)
"""


def _env() -> dict:
    return {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(REPO)}


def tiny_pipeline(workdir: Path) -> Path:
    """A small digits CNN trained through the real CLI (about 10 s): the model to measure."""
    cfg = {
        "name": "overhead", "artifacts_dir": str(workdir / "artifacts"), "seed": 0,
        "data": {"dataset": "digits", "val_split": 0.2, "test_split": 0.2},
        "model": {"arch": "cnn", "args": {"channels": [32, 64, 64]}},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.003},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "edgecli", "train", "-c", str(path), "-q"], env=_env(),
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"training the tiny model failed:\n{r.stderr}")
    return path


def edgecli_p50(config: Path, model: str, threads: int, batch: int, warmup: int, runs: int) -> tuple[float, str]:
    sets = [f"bench.models=[{model}]", "bench.torch_baseline=false", f"bench.batch_sizes=[{batch}]",
            f"bench.threads=[{threads}]", f"bench.warmup={warmup}", f"bench.runs={runs}", "bench.min_time_s=null",
            "bench.repeats=1",  # one fresh process, as the bare loop: this compares overhead, not averaging
            "bench.providers=[CPUExecutionProvider]", "bench.budgets={}"]
    cmd = [sys.executable, "-m", "edgecli", "bench", "-c", str(config), "--json", "-q"]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"edgecli bench failed (exit {r.returncode}):\n{r.stderr}")
    row = json.loads(r.stdout)["details"]["rows"][0]
    return row["p50_ms"], row["path"]


def bare_p50(path: str, threads: int, batch: int, warmup: int, runs: int) -> float:
    r = subprocess.run([sys.executable, "-c", BARE, path, str(threads), str(batch), str(warmup), str(runs)],
                       env=_env(), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bare loop failed:\n{r.stderr}")
    return float(r.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", type=Path, help="pipeline config (default: train a tiny CNN in a temp dir)")
    ap.add_argument("--model", default="train", help="stage name or .onnx path (default: train)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgecli-overhead-") as td:
        config = a.config or tiny_pipeline(Path(td))
        ours, bare = [], []
        path = None
        for i in range(a.repeats):
            order = ("edgecli", "bare") if i % 2 == 0 else ("bare", "edgecli")
            for side in order:
                if side == "edgecli":
                    p50, path = edgecli_p50(config, a.model, a.threads, a.batch, a.warmup, a.runs)
                    ours.append(p50)
                else:  # repeat 1 runs edgecli first, which tells the model's path
                    bare.append(bare_p50(path, a.threads, a.batch, a.warmup, a.runs))
            print(f"repeat {i + 1}: edgecli bench p50 {ours[-1]:.4f} ms, bare loop p50 {bare[-1]:.4f} ms, "
                  f"ratio {ours[-1] / bare[-1]:.3f}", flush=True)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"\nmodel {a.model} ({path}), batch {a.batch}, {a.threads} thread(s), {a.runs} timed runs each")
    print(f"edgecli bench p50 (median of {len(ours)}): {statistics.median(ours):.4f} ms")
    print(f"bare ORT loop p50 (median of {len(bare)}): {statistics.median(bare):.4f} ms")
    ok = 0.9 <= ratio <= 1.1
    print(f"ratio edgecli/bare: {ratio:.3f} (goal 0.9-1.1: {'ok' if ok else 'OUT OF RANGE'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
