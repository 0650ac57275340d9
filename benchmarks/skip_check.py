"""How long does `edgecli train` take to decide that an unchanged 10,000-image folder is up to date?

Builds an imagefolder of ``--files`` 8x8 PNGs in a temp dir, trains a tiny MLP on it once (the
first run hashes every file and fills the run's hash cache), then times ``--repeats`` skip
decisions in this process (in-process ``stages.train.run``: the lock, listing the folder, one
``stat`` per file against the (path, size, mtime_ns) cache, the manifest check). It then touches
one file's content and checks that train reruns. Issue 12's goal: the skip in under 2 s.

    .venv/bin/python benchmarks/skip_check.py            # 10,000 files
    .venv/bin/python benchmarks/skip_check.py --files 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from PIL import Image

    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.stages import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "imgs"
        a = np.zeros((8, 8), np.uint8)
        for i in range(args.files):
            c = i % 2
            d = root / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            a[0, 0], a[4, 4] = i % 256, 40 + c * 160
            Image.fromarray(a, "L").save(d / f"{i}.png")
        raw = {"name": "skip", "artifacts_dir": str(tmp / "artifacts"), "seed": 0,
               "data": {"dataset": "imagefolder", "path": str(root), "val_split": 0.1, "test_split": 0.1},
               "model": {"arch": "mlp", "args": {"hidden": [16]}},
               "train": {"epochs": 1, "batch_size": 256, "lr": 0.01}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_config(tmp / "c.yaml")
        store = ArtifactStore.for_config(cfg)
        t0 = time.perf_counter()
        first = train.run(cfg, store, quiet=True)
        t_first = time.perf_counter() - t0
        assert first.status == "done", first.status
        skips = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = train.run(cfg, store, quiet=True)
            skips.append(time.perf_counter() - t0)
            assert r.status == "skipped", r.status
        edited = root / "c0" / "0.png"
        a[7, 7] = 255
        Image.fromarray(a, "L").save(edited)
        t0 = time.perf_counter()
        rerun = train.run(cfg, store, quiet=True)
        t_rerun = time.perf_counter() - t0
        print(f"files: {args.files}")
        print(f"first train (hashes every file): {t_first:.2f} s")
        print(f"skip decision, unchanged folder: median {statistics.median(skips):.3f} s "
              f"(min {min(skips):.3f}, max {max(skips):.3f}, {args.repeats} runs); goal < 2 s")
        print(f"one PNG edited -> train {rerun.status} in {t_rerun:.2f} s")
        ok = statistics.median(skips) < 2.0 and rerun.status == "done"
        print("goal met" if ok else "goal NOT met")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
