"""ONNX Runtime's transformer fusions as a compress step, on the FP32 model before any quantize step.

``transformer_dims`` finds the encoder's heads and hidden size, ``transformer_fuse`` runs ONNX Runtime's
BERT optimizer, and ``fuse_step`` is the step: fuse, check the fused model against its input, time both.
"""

from __future__ import annotations

from pathlib import Path

from edgecli.compression import rounded
from edgecli.errors import ConfigError, DataError

FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def fuse_step(cfg, info, cur: Path, work: Path, data, reference, log) -> tuple[Path, dict]:
    """Fuse ``cur`` into ``work/fused.onnx``, checked against its input; return (fused path, step record).

    Quantizing first and fusing after finds nothing to fuse; fusing first lets dynamic INT8 run the
    fused Attention and quantized MatMuls (MEASURED: 0.54x PyTorch eager vs 0.98x unfused).
    """
    from edgecli.compression.quantize import Scorer, time_p50
    from edgecli.onnxio import model_bytes

    heads, hidden, src = transformer_dims(info, cfg.compress.num_heads, cfg.compress.hidden_size)
    log(f"transformer fusion (bert, {heads} heads, hidden {hidden} from {src})")
    dst = work / "fused.onnx"
    try:
        counts = transformer_fuse(cur, dst, heads, hidden)
    except Exception as e:  # noqa: BLE001 - the optimizer fails in many ways on graphs it does not know
        raise DataError(f"compress.transformer_optimize: ONNX Runtime's transformer optimizer failed on this model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
        raise DataError(f"compress.transformer_optimize: no attention was fused ({counts or 'nothing fused'}); check "
                        f"compress.num_heads/hidden_size ({heads}/{hidden}) and export with the TorchScript exporter")
    sc = Scorer(data.eval_feeds, data.labels, cfg.compress.threads, reference=reference, embedding=data.embedding)
    before, after = sc.score(cur), sc.score(dst)
    if after.get("cosine_min", 0.0) < 0.999:
        raise DataError(f"compress.transformer_optimize: the fused model disagrees with its input (min cosine "
                        f"{after.get('cosine_min', 0.0):.4f}); set compress.transformer_optimize: false")
    feed1 = {k: v[:1] for k, v in data.eval_feeds.items()}
    p0, p1 = time_p50([cur, dst], feed1, cfg.compress.threads)
    rec = {"index": -1, "kind": "transformer_optimize", "metric": data.metric,
           "options": {"model_type": "bert", "num_heads": heads, "hidden_size": hidden, "dims_from": src},
           "fused_ops": counts,
           "before": {"bytes": model_bytes(cur), "score": rounded(before["score"]), "p50_ms": rounded(p0)},
           "after": {"bytes": model_bytes(dst), "score": rounded(after["score"]), "p50_ms": rounded(p1),
                     "cosine_min": rounded(after.get("cosine_min"))}}
    return dst, rec


def transformer_dims(model_info: dict | None, num_heads: int | None, hidden_size: int | None) -> tuple[int, int, str]:
    """(num_heads, hidden_size, source) for ONNX Runtime's BERT optimizer.

    Given values win; else the pretrained model's config.json (model.args.model_dir or the packaged
    MiniLM). ORT's own detection fails on TorchScript exports and then silently leaves Attention
    unfused, so they are never left to it.
    """
    if num_heads and hidden_size:
        return int(num_heads), int(hidden_size), "compress.num_heads/hidden_size"
    info = model_info or {}
    arch = str(info.get("arch", ""))
    if info.get("kind") != "text" and "minilm" not in arch.lower():
        raise ConfigError("compress.transformer_optimize: set compress.num_heads and compress.hidden_size "
                          "(this model does not say which transformer it is)")
    import json as _json

    from edgecli.data.text import resolve_model_dir

    try:
        d = resolve_model_dir((info.get("args") or {}).get("model_dir"))
        conf = _json.loads((d / "config.json").read_text())
        heads, hidden = int(conf["num_attention_heads"]), int(conf["hidden_size"])
    except (DataError, OSError, KeyError, ValueError) as e:
        raise ConfigError(f"compress.transformer_optimize: cannot read the encoder's heads and hidden size "
                          f"({getattr(e, 'message', e)}); set compress.num_heads and compress.hidden_size") from None
    return int(num_heads or heads), int(hidden_size or hidden), f"{d.name}/config.json"


def transformer_fuse(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse a BERT-style FP32 graph (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm) into dst.

    Must run before quantization: the fused kernels are what make INT8 pay, and fusing an
    already-quantized graph finds nothing (MatMulInteger breaks the patterns). Returns the count
    of each fused op in the result.
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from edgecli.compression.quantize_modes import quiet_ort

    with quiet_ort():
        m = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
        m.save_model_to_file(str(dst))
    g = onnx.load(str(dst), load_external_data=False).graph
    counts: dict[str, int] = {}
    for n in g.node:
        if n.op_type in FUSED_OPS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
