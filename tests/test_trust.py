"""Issue 12, section 1: the skip decision comes from what a stage really read.

In-process stage calls (``stages.<x>.run``) on tiny tables and image folders: an edited CSV cell,
an added or edited PNG, or a changed custom model source reruns train, and compress, export and
bench then record the new upstream manifest.
"""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgecli.artifacts import ArtifactStore
from edgecli.config import load_config


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _cfg(tmp: Path, data: dict, model: dict | None = None, **sections):
    raw = {"name": "t", "artifacts_dir": str(tmp / "artifacts"), "seed": 0,
           "data": {"val_split": 0.25, "test_split": 0.25, **data},
           "model": model or {"arch": "mlp", "args": {"hidden": [16]}},
           "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
           "compress": {"steps": [{"quantize": {"mode": "dynamic"}}], "objective": "size"},
           "bench": {"warmup": 2, "runs": 10, "batch_sizes": [1], "threads": [1], "repeats": 1,
                     "models": ["train", "export"], "torch_baseline": False},
           **sections}
    p = tmp / "config.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(p)
    return cfg, ArtifactStore.for_config(cfg)


def _write_csv(path: Path, rows: int = 48, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    x = rng.normal(size=(rows, 3)) + y[:, None] * 2.0
    lines = ["f0,f1,f2,label"] + [f"{a:.4f},{b:.4f},{c:.4f},{lab}" for (a, b, c), lab in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _train(cfg, store):
    from edgecli.stages import train

    return train.run(cfg, store, quiet=True)


def _up(store, stage):
    return _sha(store.stage_dir(stage) / "manifest.json")


def test_csv_cell_reruns_train_and_downstream_records_it(tmp_path):
    from edgecli.stages import bench, compress, export

    csv = tmp_path / "d.csv"
    _write_csv(csv)
    cfg, store = _cfg(tmp_path, {"dataset": "csv", "path": str(csv)})
    assert _train(cfg, store).status == "done"
    inputs = store.manifest("train")["inputs"]
    assert inputs == {"data:d.csv": _sha(csv)}  # the manifest lists what train read, with its sha256
    assert _train(cfg, store).status == "skipped"
    assert compress.run(cfg, store, quiet=True).status == "done"
    assert export.run(cfg, store, quiet=True).status == "done"
    old_train = _up(store, "train")

    lines = csv.read_text().splitlines()
    lines[5] = "9.0," + lines[5].split(",", 1)[1]  # one cell
    csv.write_text("\n".join(lines) + "\n")
    assert _train(cfg, store).status == "done"
    assert _up(store, "train") != old_train
    assert compress.run(cfg, store, quiet=True).status == "done"
    assert store.manifest("compress")["upstream"]["train"] == _up(store, "train")
    assert export.run(cfg, store, quiet=True).status == "done"
    assert store.manifest("export")["upstream"]["compress"] == _up(store, "compress")
    res = bench.run(cfg, store, quiet=True)
    assert res.status == "done"
    assert store.manifest("bench")["upstream"] == {"train": _up(store, "train"), "export": _up(store, "export")}


def _png(path: Path, value: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.clip(rng.normal(value, 20, size=(8, 8)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)


def test_added_or_edited_png_reruns_train(tmp_path):
    root = tmp_path / "imgs"
    for c, v in (("dark", 40), ("light", 200)):
        for i in range(8):
            _png(root / c / f"{i}.png", v, i + v)
    cfg, store = _cfg(tmp_path, {"dataset": "imagefolder", "path": str(root)})
    assert _train(cfg, store).status == "done"
    assert len(store.manifest("train")["inputs"]) == 16
    assert _train(cfg, store).status == "skipped"
    _png(root / "dark" / "new.png", 40, 99)
    assert _train(cfg, store).status == "done"
    assert "data:dark/new.png" in store.manifest("train")["inputs"]
    assert _train(cfg, store).status == "skipped"
    _png(root / "light" / "3.png", 180, 7)  # same name, new pixels
    assert _train(cfg, store).status == "done"
    assert store.manifest("train")["inputs"]["data:light/3.png"] == _sha(root / "light" / "3.png")


def test_custom_model_source_change_reruns_train(tmp_path, monkeypatch):
    mod = tmp_path / "src" / "trust_custom_net.py"
    mod.parent.mkdir()
    body = textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, input_shape, num_classes, hidden=HIDDEN):
                super().__init__()
                self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                                                nn.Linear(hidden, num_classes))

            def forward(self, x):
                return self.classifier(x)
    """)
    mod.write_text(body.replace("HIDDEN", "8"))
    monkeypatch.syspath_prepend(str(mod.parent))
    csv = tmp_path / "d.csv"
    _write_csv(csv)
    cfg, store = _cfg(tmp_path, {"dataset": "csv", "path": str(csv)}, model={"arch": "trust_custom_net:Net"})
    try:
        assert _train(cfg, store).status == "done"
        assert store.manifest("train")["inputs"]["model.arch:trust_custom_net.py"] == _sha(mod)
        assert _train(cfg, store).status == "skipped"
        mod.write_text(body.replace("HIDDEN", "12"))  # a changed default in the source file
        assert _train(cfg, store).status == "done"
    finally:
        sys.modules.pop("trust_custom_net", None)


def test_hash_cache_answers_unchanged_files_from_stat(tmp_path, monkeypatch):
    """The (path, size, mtime_ns) cache: an unchanged file is not read again; a changed one is."""
    import edgecli.artifacts as art

    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    c = art.HashCache(tmp_path / ".hashcache.json")
    first = c.sha256(f)
    c.save()
    reads = []
    real = art.sha256_file
    monkeypatch.setattr(art, "sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    c2 = art.HashCache(tmp_path / ".hashcache.json")
    assert c2.sha256(f) == first and reads == []
    f.write_bytes(b"y" * 1001)
    assert c2.sha256(f) == _sha(f) != first and reads == [f]


@pytest.mark.slow
def test_unchanged_10k_imagefolder_skips(tmp_path):
    """benchmarks/skip_check.py prints the time; this checks only that it skips."""
    from PIL import Image

    root = tmp_path / "imgs"
    a = np.zeros((8, 8), np.uint8)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5000):
            a[0, 0], a[1, 1] = i % 256, c * 200
            Image.fromarray(a, "L").save(root / f"c{c}" / f"{i}.png")
    cfg, store = _cfg(tmp_path, {"dataset": "imagefolder", "path": str(root)},
                      train={"epochs": 1, "batch_size": 256, "lr": 0.01})
    assert _train(cfg, store).status == "done"
    assert _train(cfg, store).status == "skipped"
