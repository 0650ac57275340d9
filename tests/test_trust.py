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
        sys.modules.pop("trust_custom_net", None)
        from edgecli.errors import ConfigError
        from edgecli.stages import compress

        pcfg, _ = _cfg(tmp_path, {"dataset": "csv", "path": str(csv)}, model={"arch": "trust_custom_net:Net"},
                       compress={"steps": [{"prune": {"ratio": 0.5, "finetune_epochs": 0}}]})
        with pytest.raises(ConfigError, match="no longer fit 'trust_custom_net:Net'"):  # weights vs changed code
            compress.run(pcfg, store, quiet=True)
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


# --------------------------------------------------------------------------- section 4: tables and labels


@pytest.fixture(scope="module")
def csv_model(tmp_path_factory):
    """A tiny MLP trained once on a 3-feature CSV, its ONNX model and the rows it was trained on."""
    tmp = tmp_path_factory.mktemp("csvmodel")
    csv = tmp / "d.csv"
    _write_csv(csv, rows=60)
    cfg, store = _cfg(tmp, {"dataset": "csv", "path": str(csv)}, train={"epochs": 5, "batch_size": 32, "lr": 0.02})
    assert _train(cfg, store).status == "done"
    return tmp, csv, store


def _answers(model: Path, rows_csv: Path):
    from edgecli.inputs import reader_for
    from edgecli.onnxio import model_info_from_onnx
    from edgecli.runtimes.ort import make_session

    sess = make_session(model, threads=1)
    specs = [{"name": i.name, "shape": i.shape, "dtype": i.type} for i in sess.get_inputs()]
    from edgecli.errors import DataError

    sample = reader_for(model_info_from_onnx(model), specs).file(rows_csv, rows_csv.name)
    if sample.error:
        raise DataError(sample.error)
    return sess.run(None, sample.feeds)[0].argmax(1)


def test_feature_names_are_stored_and_reordered_columns_give_the_same_answers(csv_model, tmp_path):
    from edgecli.errors import DataError
    from edgecli.onnxio import model_info_from_onnx

    tmp, csv, store = csv_model
    model = store.stage_dir("train") / "model.onnx"
    assert model_info_from_onnx(model)["feature_names"] == ["f0", "f1", "f2"]
    lines = [r.split(",") for r in csv.read_text().splitlines()]
    same = tmp_path / "same.csv"
    same.write_text("\n".join(",".join(r[:3]) for r in lines) + "\n")
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("\n".join(",".join([r[2], r[3], r[0], r[1]]) for r in lines) + "\n")  # f2,label,f0,f1
    assert (_answers(model, same) == _answers(model, shuffled)).all()
    missing = tmp_path / "missing.csv"
    missing.write_text("\n".join(",".join([r[0], r[1]]) for r in lines) + "\n")
    with pytest.raises(DataError, match="column 'f2' is missing"):
        _answers(model, missing)
    extra = tmp_path / "extra.csv"
    extra.write_text("\n".join(",".join(r[:3] + (["age"] if i == 0 else ["1"])) for i, r in enumerate(lines)) + "\n")
    with pytest.raises(DataError, match="column 'age' is not a feature"):
        _answers(model, extra)


def _load(tmp: Path, text: str, **data):
    from edgecli.data import load_raw

    p = tmp / "t.csv"
    p.write_text(text)
    cfg, _ = _cfg(tmp, {"dataset": "csv", "path": str(p), **data})
    return load_raw(cfg)


def test_labels_are_read_the_way_the_user_wrote_them(tmp_path):
    from edgecli.errors import DataError

    rows = "".join(f"{i},{i % 2}{'.0' if i % 4 == 1 else ''}\n" for i in range(12))
    ds = _load(tmp_path, "x,label\n" + rows)
    assert ds.class_names == ["0", "1"]  # 1 and 1.0 are one class
    ds = _load(tmp_path, "x,label\n" + rows, class_names={0: "malignant", 1: "benign"})
    assert ds.class_names == ["malignant", "benign"] and list(ds.y[:2]) == [0, 1]
    with pytest.raises(DataError, match=r"t.csv:4: the label \('label'\) is blank"):
        _load(tmp_path, "x,label\n0,0\n1,1\n2,\n" + rows)
    with pytest.raises(DataError, match="column 1 has no name"):  # pandas' index column
        _load(tmp_path, ",x,label\n" + "".join(f"{i},{r}" for i, r in enumerate(rows.splitlines(True))))


def test_zero_splits_are_a_data_error_before_training(tmp_path):
    from edgecli.data import load_splits
    from edgecli.errors import DataError

    for key in ("val_split", "test_split"):
        cfg, _ = _cfg(tmp_path, {"dataset": "digits", key: 0.0})
        with pytest.raises(DataError, match=f"data.{key}: 0.0 leaves no"):
            load_splits(cfg)


# --------------------------------------------------------------------------- section 6: images


def test_16bit_png_is_scaled_and_exif_orientation_applied(tmp_path):
    from PIL import Image

    from edgecli.data.images import load_image_file

    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # up to 63000 of 65535
    Image.fromarray(a).save(tmp_path / "deep.png")  # uint16: a 16-bit grayscale PNG
    got = load_image_file(str(tmp_path / "deep.png"), 1)[..., 0]
    np.testing.assert_allclose(got, np.rint(a * 255.0 / 65535), atol=1)  # scaled, not clipped at 255
    assert got.max() < 250 and got[0, 1] == 4

    img = np.zeros((4, 6), np.uint8)
    img[0, 5] = 255  # top-right pixel
    im = Image.fromarray(img, "L")
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    got = load_image_file(str(tmp_path / "rot.jpg"), 1)
    assert got.shape[:2] == (6, 4)  # the orientation tag was applied


def test_nested_class_folders_are_used(tmp_path):
    from edgecli.data import load_raw

    root = tmp_path / "imgs"
    for c, v in (("a", 30), ("b", 220)):
        for i in range(6):
            _png(root / c / f"{i}.png", v, i)
            _png(root / c / "sub" / "deeper" / f"{i}.png", v, 50 + i)
    cfg, _ = _cfg(tmp_path, {"dataset": "imagefolder", "path": str(root)})
    ds = load_raw(cfg)
    assert len(ds) == 24 and list(np.bincount(ds.y)) == [12, 12]


# --------------------------------------------------------------------------- section 5: validate


_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, input_shape, num_classes, hidden=8):
        super().__init__()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.Linear(hidden, OUT))

    def forward(self, x):
        return RET
"""

_CASES = {
    "syntax": ("def broken(:\n", "Net", {}, "importing 'trust_v_syntax' failed at line 1"),
    "raises": ("raise RuntimeError('boom at import')\n", "Net", {}, "RuntimeError: boom at import"),
    "function": ("def Net(input_shape, num_classes):\n    return 1\n", "Net", {}, "is a function, not a torch.nn.Module class"),
    "not_module": ("class Net:\n    def __init__(self, input_shape, num_classes):\n        pass\n", "Net", {},
                   "not a torch.nn.Module"),
    "signature": ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n",
                  "Net", {}, "cannot build"),
    "typo_arg": (_NET.replace("OUT", "num_classes").replace("RET", "self.classifier(x)"), "Net", {"hiden": 4},
                 "takes no argument 'hiden'"),
    "forward": (_NET.replace("OUT", "num_classes").replace("RET", "self.classifier(x[:, :1])"), "Net", {},
                "fails forward on one sample of shape \\[1, 3\\]"),
    "tuple": (_NET.replace("OUT", "num_classes").replace("RET", "(self.classifier(x), x)"), "Net", {},
              "returns a tuple"),
    "outputs": (_NET.replace("OUT", "7").replace("RET", "self.classifier(x)"), "Net", {}, "outputs shape \\[1, 7\\]"),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_validate_refuses_what_train_would(case, tmp_path, monkeypatch):
    """validate builds the model and runs one forward: each model-code mistake is one line, exit 2."""
    from edgecli.errors import ConfigError
    from edgecli.validate import check_model, check_names

    src, cls, args, msg = _CASES[case]
    name = f"trust_v_{case}"
    (tmp_path / f"{name}.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    csv = tmp_path / "d.csv"
    _write_csv(csv)
    cfg, _ = _cfg(tmp_path, {"dataset": "csv", "path": str(csv)}, model={"arch": f"{name}:{cls}", "args": args})
    try:
        with pytest.raises(ConfigError, match=msg) as e:
            check_names(cfg)
            check_model(cfg)
        assert e.value.exit_code == 2
    finally:
        sys.modules.pop(name, None)


def test_validate_refuses_missing_data_empty_class_folder_and_init_from(tmp_path):
    from edgecli.errors import ConfigError, DataError
    from edgecli.validate import check_model

    cfg, _ = _cfg(tmp_path, {"dataset": "csv", "path": str(tmp_path / "nope.csv")})
    with pytest.raises(DataError, match="does not exist"):
        check_model(cfg)
    root = tmp_path / "imgs"
    for i in range(4):
        _png(root / "a" / f"{i}.png", 30, i)
    (root / "b").mkdir()
    cfg, _ = _cfg(tmp_path, {"dataset": "imagefolder", "path": str(root)})
    with pytest.raises(DataError, match="zero samples: b"):
        check_model(cfg)
    csv = tmp_path / "d.csv"
    _write_csv(csv)
    cfg, _ = _cfg(tmp_path, {"dataset": "csv", "path": str(csv)},
                  train={"epochs": 1, "init_from": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ConfigError, match="train.init_from: no weights"):
        check_model(cfg)


def test_schema_refuses_torch_step_after_quantize_with_file_line(tmp_path):
    from edgecli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config.yaml:\d+ .*must come before every quantize step"):
        _cfg(tmp_path, {"dataset": "digits"},
             compress={"steps": [{"quantize": {"mode": "dynamic"}}, {"prune": {"ratio": 0.5}}]})
    with pytest.raises(ConfigError, match="qoperator applies to static"):
        _cfg(tmp_path, {"dataset": "digits"},
             compress={"steps": [{"quantize": {"mode": "dynamic", "format": "qoperator"}}]})


# --------------------------------------------------------------------------- section 3: bench confirms the choice


def test_latency_check_publishes_only_what_bench_confirms_faster(tmp_path):
    """compress's final check runs the bench worker in fresh processes: a 'choice' that bench measures
    slower than its input is not published (the input is), and a faster one is."""
    import torch

    from edgecli.compression.confirm import confirm_choice
    from edgecli.onnxio import export_onnx

    def mlp(width, depth):
        layers = [torch.nn.Linear(64, width)] + [torch.nn.Linear(width, width) for _ in range(depth)]
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)).eval()

    x = torch.randn(1, 64)
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    export_onnx(mlp(16, 1), (x,), small)
    export_onnx(mlp(1024, 6), (x,), big)  # ~6M MACs against ~2k: slower by far more than any noise
    feed = {"input": x.numpy()}
    slower = confirm_choice([("input", small), ("compress choice", big)], feed, 1, repeats=1,
                            min_speedup=0.03, tmp=tmp_path)
    assert slower["chosen_index"] == 0 and slower["reason"].startswith("not confirmed")
    assert [m["processes"] for m in slower["models"]] == [1, 1]
    faster = confirm_choice([("input", big), ("compress choice", small)], feed, 1, repeats=1,
                            min_speedup=0.03, tmp=tmp_path)
    assert faster["chosen_index"] == 1 and faster["reason"].startswith("confirmed")


def test_data_package_has_no_import_cycle():
    """Issue 15 item 6: text no longer imports datasets (data/base.py, data/images.py); any import,
    function-level included, counts."""
    import ast

    from tests.conftest import REPO

    pkg = REPO / "edgecli" / "data"
    graph: dict[str, set[str]] = {}
    for f in pkg.glob("*.py"):
        mod = "edgecli.data" if f.stem == "__init__" else f"edgecli.data.{f.stem}"
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgecli.data"):
                deps.add(node.module)
        graph[mod] = deps - {mod}
    assert "edgecli.data.datasets" not in graph["edgecli.data.text"]

    def visit(m, stack):
        for d in graph.get(m, ()):
            assert d not in stack, f"import cycle: {' -> '.join([*stack, d])}"
            visit(d, [*stack, d])

    for m in graph:
        if m != "edgecli.data":  # the package re-exports; its loaders are named in the registry, not imported
            visit(m, [m])


# --------------------------------------------------------------------------- section 2: the metric follows the output


def test_fidelity_metric_is_chosen_from_the_output(tmp_path):
    import onnx
    import torch

    from edgecli.compression.quantize import output_kind

    def model(width, name, rank3=False):
        net = torch.nn.Linear(4, width).eval()
        p = tmp_path / f"{name}-{width}-{rank3}.onnx"
        x = torch.zeros(1, 3, 4) if rank3 else torch.zeros(1, 4)
        torch.onnx.export(net, (x,), str(p), dynamo=False, input_names=["x"], output_names=[name],
                          dynamic_axes={"x": {0: "b"}, name: {0: "b"}})
        return onnx.load(str(p))

    assert output_kind(model(384, "y"), None, None)[0] == "embedding"  # an external sentence embedder
    assert output_kind(model(384, "y", rank3=True), None, None)[0] == "embedding"  # token embeddings
    assert output_kind(model(1, "y"), None, None)[0] == "embedding"  # a regressor
    assert output_kind(model(5, "y"), None, None)[0] == "class_scores"
    assert output_kind(model(100, "y"), None, 100)[0] == "class_scores"  # the data's class count
    assert output_kind(model(100, "logits"), None, None)[0] == "class_scores"
    assert output_kind(model(10, "logits"), {"output_names": ["embedding"]}, None)[0] == "embedding"


def test_decompression_bomb_in_an_imagefolder_is_skipped_by_name_not_the_end_of_training(tmp_path):
    """Issue 12, section 6: one PNG whose header claims 30000x30000 pixels (PIL's DecompressionBombError)
    is a per-input error: train runs on the other images, names the file it skipped and records it."""
    import struct
    import zlib

    root = tmp_path / "imgs"
    for c, v in (("dark", 40), ("light", 200)):
        for i in range(8):
            _png(root / c / f"{i}.png", v, i + v)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (root / "dark" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    cfg, store = _cfg(tmp_path, {"dataset": "imagefolder", "path": str(root)})
    res = _train(cfg, store)
    assert res.status == "done"
    said = [m for m in res.messages if "bomb.png" in m]
    assert said and "900000000 pixels" in said[0] and "skipped" in said[0], res.messages
    manifest = store.manifest("train")
    assert sum(manifest["split_sizes"].values()) == 16  # the 16 readable images, not the bomb
    assert [s["file"] for s in manifest["skipped_inputs"]] == ["dark/bomb.png"]
    assert "data:dark/bomb.png" in manifest["inputs"]  # still declared: replacing it reruns train
