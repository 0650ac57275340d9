"""Every runtime x precision side by side, and what `export.targets: auto` chooses (issue 14; not a pytest).

For digits-cnn, digits-resnet8, digits-mobilenet and minilm-embed: train (short), compress and
export as each config says, then run edgecli's own auto choice (edgecli.runtimes.choose, the code
`export.targets: auto` runs) with PyTorch eager timed in the same interleaved rounds as a reference.
ONNX Runtime FP32 is one of auto's own candidates (the export's model when it is float, else the
train model behind it). One table per model: every runtime x precision, the precision it ran in
(OpenVINO's compiled inference precision), p50 at batch 1 and 1 thread, size, accuracy on the
parity samples of the test split (min cosine to FP32 for the embedder), ratios vs ORT FP32 and
PyTorch eager, verdict; then auto's choice against the goals. The CPU flags are printed first.

    nice .venv/bin/python benchmarks/runtimes.py [--artifacts DIR] [--only digits-cnn] [--repeats 3]

About 30 minutes on a 2-vCPU EPYC (15 with the artifacts of an earlier run kept in --artifacts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# config -> short-training overrides (a few minutes in all) and the goal for auto's choice
MODELS = {
    "digits-cnn": {"sets": ["train.epochs=10"], "goal": None},
    "digits-resnet8": {"sets": ["train.epochs=8"], "goal": {"vs_ort": 0.45, "drop": 0.01}},
    "digits-mobilenet": {"sets": ["train.epochs=6"], "goal": {"vs_ort": 0.75}},
    "minilm-embed": {"sets": ["bench.runs=60", "bench.warmup=10"], "goal": {"vs_torch": 0.30, "cos": 0.99, "size": 0.30}},
}


def run_model(name: str, artifacts: str, repeats: int) -> dict:
    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.onnxio import is_quantized, load_onnx, model_info_from_onnx, model_inputs, parity_samples
    from edgecli.runtimes import targets as tg
    from edgecli.runtimes.choose import choose
    from edgecli.stages import compress, export, train

    sets = [f"artifacts_dir={artifacts}", f"bench.repeats={repeats}", "export.targets=[onnx]", *MODELS[name]["sets"]]
    cfg = load_config(REPO / "configs" / f"{name}.yaml", sets)
    store = ArtifactStore.for_config(cfg)
    t0 = time.time()
    for stage in (train, compress, export):
        stage.run(cfg, store, quiet=True)
    print(f"[{name}] train/compress/export {time.time() - t0:.0f} s", file=sys.stderr)
    final = store.require("export", "model.onnx")
    m = load_onnx(final, load_external=False)
    info = model_info_from_onnx(final)
    feeds, labels, _ = parity_samples(cfg, info, model_inputs(m), cfg.export.parity.samples)
    cm = store.require("compress", "model.onnx")  # export's input, before ORT's offline fusions
    src = tg.source(cfg, store, "compress", cm, info, is_quantized(load_onnx(cm, load_external=False)), feeds, labels)
    tinfo = store.manifest("train")["model_info"]
    # ORT FP32 is a candidate of the choice itself (the export's model, or the float model behind a quantized one)
    refs = [("pytorch eager", {"kind": "torch", "weights": str(store.require("train", "weights.safetensors")),
                               "model_info": tinfo, "num_classes": tinfo.get("num_classes")})]
    with tempfile.TemporaryDirectory(prefix="edgecli-runtimes-") as tmp:
        t0 = time.time()
        _, table = choose(cfg, src, Path(tmp), final, lambda msg: print(f"[{name}] {msg}", file=sys.stderr), refs)
        print(f"[{name}] auto {time.time() - t0:.0f} s", file=sys.stderr)
    table["fp32_bytes"] = store.require("train", "model.onnx").stat().st_size
    return table


def render(name: str, t: dict) -> list[str]:
    rows = t["rows"]
    ort = next(r for r in rows if r["candidate"] == t["baseline"])
    torch_row = next(r for r in rows if r["candidate"] == "pytorch eager")
    lines = [f"\n## {name}: auto chose {t['chosen']} ({t['protocol']})", "",
             "| candidate | ran in | p50 ms | vs ORT FP32 | vs PyTorch | size KB | accuracy / min cos | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("parity") or {}
        q = (f"min cos {p['min_cosine']:.4f}" if "min_cosine" in p else
             f"{p['accuracy']:.4f} ({-p['accuracy_drop']:+.4f})" if "accuracy" in p else "-")
        p50 = r.get("p50_ms")
        ran = r.get("ran_precision") or r.get("precision") or ("fp32" if r["candidate"] == "pytorch eager" else "-")
        lines.append(f"| {r['candidate']} | {ran} | {p50:.4f} | {p50 / ort['p50_ms']:.2f}x | "
                     f"{p50 / torch_row['p50_ms']:.2f}x " if p50 else f"| {r['candidate']} | {ran} | - | - | - ")
        lines[-1] += f"| {r['bytes'] / 1024:.1f} | {q} | {r['why']} |" if r.get("bytes") else f"| - | {q} | {r['why']} |"
    lines += [f"\n{n}" for n in t.get("notes") or []]
    return lines


def goals(name: str, t: dict) -> list[str]:
    g = MODELS[name]["goal"]
    rows = {r["candidate"]: r for r in t["rows"]}
    ch = rows[t["chosen"]]
    ort, torch_row = rows[t["baseline"]], rows["pytorch eager"]
    vs_ort, vs_torch = ch["p50_ms"] / ort["p50_ms"], ch["p50_ms"] / torch_row["p50_ms"]
    p = ch.get("parity") or {}
    out = [f"{name}: auto -> {t['chosen']}: {vs_ort:.2f}x ORT FP32, {vs_torch:.2f}x PyTorch eager, "
           f"{ch['bytes'] / t['fp32_bytes']:.2f}x FP32 size"
           + (f", min cos {p['min_cosine']:.4f}" if "min_cosine" in p else "")
           + (f", accuracy drop {p['accuracy_drop']:+.4f}" if "accuracy_drop" in p else "")]
    if not g:
        out[-1] += f" (never slower than ORT FP32: {'yes' if vs_ort <= 1.0 else 'NO'})"
        return out
    checks = []
    if "vs_ort" in g:
        checks.append(f"<= {g['vs_ort']}x ORT FP32: {'met' if vs_ort <= g['vs_ort'] else 'MISSED'}")
    if "drop" in g:
        checks.append(f"drop <= {g['drop']}: {'met' if p.get('accuracy_drop', 0) <= g['drop'] else 'MISSED'}")
    if "vs_torch" in g:
        checks.append(f"<= {g['vs_torch']}x PyTorch: {'met' if vs_torch <= g['vs_torch'] else 'MISSED'}")
    if "cos" in g:
        checks.append(f"min cos >= {g['cos']}: {'met' if p.get('min_cosine', 1.0) >= g['cos'] else 'MISSED'}")
    if "size" in g:
        checks.append(f"size <= {g['size']}x: {'met' if ch['bytes'] / t['fp32_bytes'] <= g['size'] else 'MISSED'}")
    checks.append(f"never slower than ORT FP32: {'yes' if vs_ort <= 1.0 else 'NO'}")
    out.append("  goals: " + "; ".join(checks))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="/tmp/edgecli-runtimes/artifacts")
    ap.add_argument("--only", action="append", choices=sorted(MODELS), help="run only these models")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per candidate (interleaved)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import re

    from edgecli.report import env_line
    from edgecli.runtimes.env import environment

    flags = sorted(set(re.findall(r"\b(avx2|avx512f|avx512_vnni|avx512_bf16|amx[a-z_]*)\b",
                                  Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")))
    print(f"# edge runtimes side by side\n\n{env_line(environment())}\nCPU flags: {' '.join(flags) or 'unknown'}")
    summary = []
    for name in args.only or list(MODELS):
        table = run_model(name, args.artifacts, args.repeats)
        print("\n".join(render(name, table)), flush=True)
        summary += goals(name, table)
    print("\n## auto's choice against the goals\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
