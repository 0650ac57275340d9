"""Write N images of the digits test split as PNG files (8-bit grayscale, as a user would hold them).

    python scripts/sample_digits.py --out artifacts/samples -n 5
    edgecli infer -c configs/digits-cnn.yaml artifacts/samples/*.png

The split is the pipeline's own (config seed and split fractions), so these images were never
trained on. labels.csv beside them gives each file's true label.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", default="configs/digits-cnn.yaml", help="pipeline config (its data section and seed)")
    ap.add_argument("--out", "-o", required=True, help="directory for the PNG files")
    ap.add_argument("-n", type=int, default=5, help="number of images (at most the test split's size)")
    args = ap.parse_args(argv)

    from PIL import Image

    from edgecli.config import load_config
    from edgecli.data import load_splits
    from edgecli.errors import EdgeError, report

    try:
        cfg = load_config(args.config)
        splits = load_splits(cfg)
    except EdgeError as e:
        return report(e)
    if splits.kind != "image":
        print(f"error: {args.config}: dataset is {splits.kind} data, not images", file=sys.stderr)
        return 2
    test = splits.test
    n = min(max(args.n, 0), len(test))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = test.raw[i]
        label = splits.class_names[int(test.y[i])]
        name = f"digit_{i:04d}_label{label}.png"
        mode = "L" if img.shape[2] == 1 else "RGB"
        Image.fromarray(img[:, :, 0] if mode == "L" else img, mode).save(out / name)
        rows.append((name, label, int(test.y[i])))
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "index"])
        w.writerows(rows)
    print(f"wrote {n} test images to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
