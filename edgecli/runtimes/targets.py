"""Export targets beyond ONNX: build each file, check it against the float reference, describe it.

``export.targets`` names ``onnx``, ``ort`` (the export stage's own files), ``tflite`` (LiteRT),
``pte`` (ExecuTorch), ``openvino`` (an OpenVINO IR), each optionally with a precision
(``tflite:int8``, ``openvino:int8-weights+bf16``; default fp32), or is ``auto``: every runtime x
precision available here is built, checked, timed with bench's protocol, and the fastest that holds
the accuracy gate is published (see edgecli/runtimes/choose.py).

Where a target comes from: LiteRT and ExecuTorch convert the trained PyTorch module (the train
stage's weights); OpenVINO converts the float ONNX model (the export input when it is float, else
the train stage's model.onnx: OpenVINO does not compile ONNX Runtime's QDQ models, so its INT8 is
made by NNCF). Calibration uses the first samples of the training split, through the model's own
preprocessing, as compress does.

The gate, on the same test-split samples as export's parity (the reference is the float model
run by ONNX Runtime):
- fp32: max abs diff <= export.parity.atol and top-1 agreement 100% (an embedder: the same atol);
- reduced precision (int8, bf16): top-1 agreement >= export.parity.min_agreement_quantized and
  accuracy drop <= compress.max_accuracy_drop (0.01 when unset); an embedder: min cosine >= 1 - that drop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecli.errors import ArtifactError, CheckFailed, ConfigError

# target name -> (backend, precisions); "onnx" and "ort" are the export stage's own files
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnx": ("onnxruntime", ("as-input",)),
    "ort": ("onnxruntime", ("as-input",)),
    "tflite": ("litert", ("fp32", "int8")),
    "pte": ("executorch", ("fp32", "int8")),
    "openvino": ("openvino", ("fp32", "bf16", "int8-weights", "int8-weights+bf16", "int8", "int8+bf16")),
}
BACKEND_TARGET = {"litert": "tflite", "executorch": "pte", "openvino": "openvino"}
DEFAULT_MAX_DROP = 0.01
CALIB_SAMPLES = 64


def parse(item: str) -> tuple[str, str]:
    """("tflite", "int8") from "tflite:int8"; a ConfigError naming the known names otherwise."""
    from edgecli.registry import did_you_mean

    name, _, prec = str(item).partition(":")
    if name not in TARGETS:
        raise ConfigError(f"export.targets: unknown target '{name}'{did_you_mean(name, TARGETS)}; "
                          f"choose from {', '.join(TARGETS)} or auto")
    precs = TARGETS[name][1]
    prec = prec or precs[0]
    if prec not in precs:
        raise ConfigError(f"export.targets: {name} has no precision '{prec}'{did_you_mean(prec, precs)}; "
                          f"choose from {', '.join(precs)}")
    return name, prec


def file_name(target: str, precision: str) -> str:
    suffix = {"onnx": ".onnx", "tflite": ".tflite", "pte": ".pte", "openvino": ".xml"}[target]
    tag = "" if precision == "fp32" else "-" + precision.replace("+", "-")
    return f"model{tag}{suffix}"


@dataclass
class Source:
    """What every target is built from and checked against."""

    onnx: Path  # the float ONNX model (OpenVINO's input, and the parity reference)
    info: dict | None
    torch_ok: str | None  # None when the PyTorch module can be built; else why not
    feeds: dict[str, np.ndarray]  # parity samples (test split), keyed by the ONNX input names
    labels: np.ndarray | None
    ref: np.ndarray  # the float model's first output on ``feeds`` (ONNX Runtime)
    calib: dict[str, np.ndarray]
    embed: bool
    text: bool
    weights: Path | None = None
    max_drop: float = DEFAULT_MAX_DROP
    notes: list[str] = field(default_factory=list)

    def module(self, cfg):
        """The float PyTorch module (trained weights), built from the train stage's trusted model_info."""
        if self.torch_ok:
            raise ConfigError(f"export.targets: {self.torch_ok}")
        from edgecli.models import build_from_info
        from edgecli.training import load_weights_file

        model = build_from_info(self.info)
        model.load_state_dict(load_weights_file(self.weights))
        return model.eval()


def source(cfg, store, stage: str | None, src: Path, info: dict | None, quantized: bool, feeds: dict,
           labels: np.ndarray | None) -> Source:
    """The float model behind the export input, its parity reference and its calibration samples."""
    from edgecli.models import trusted_archs, trusted_info

    onnx_path, torch_ok, weights, tinfo = src, None, None, info
    if quantized or stage is None:
        if not store.exists("train"):
            raise ArtifactError("export.targets: the runtime targets are converted from the float model, and the "
                                "export input is quantized (or a file) with no train stage beside it",
                                hint="run `edgecli train -c <config>` first, or export a float model")
        onnx_path = store.require("train", "model.onnx")
    if store.exists("train"):
        weights = store.require("train", "weights.safetensors")
        man = store.manifest("train")
        tinfo = trusted_info(man.get("model_info"), trusted_archs(cfg), str(store.stage_dir("train") / "manifest.json"))
    else:
        torch_ok = "tflite and pte are converted from the trained PyTorch weights; run `edgecli train` first"
    kind = ((tinfo or info or {}).get("preprocess") or {}).get("kind")
    if kind == "text" and torch_ok is None:
        torch_ok = "tflite and pte cover image and table models here; a text model deploys as openvino or onnx"
    from edgecli.runtimes.ort import make_session, run_batched

    ref = np.asarray(run_batched(make_session(onnx_path, optimization="disable"), feeds), dtype=np.float64)
    embed = _is_embedder(onnx_path)
    drop = cfg.compress.max_accuracy_drop
    return Source(onnx=onnx_path, info=tinfo, torch_ok=torch_ok, feeds=feeds, labels=labels, ref=ref,
                  calib=_calibration(cfg, tinfo or info, feeds), embed=embed, text=kind == "text", weights=weights,
                  max_drop=DEFAULT_MAX_DROP if drop is None else float(drop))


def _is_embedder(path: Path) -> bool:
    from edgecli.onnxio import load_onnx

    m = load_onnx(path, load_external=False)
    return bool(m.graph.output) and m.graph.output[0].name == "embedding"


def _calibration(cfg, info: dict | None, feeds: dict) -> dict[str, np.ndarray]:
    """The first training samples through the model's preprocessing (parity samples when there are none)."""
    if info and info.get("preprocess"):
        from edgecli.data import load_splits
        from edgecli.data.preprocess import PreprocessSpec

        splits = load_splits(cfg)
        x = PreprocessSpec.from_dict(info["preprocess"]).apply(splits.train.raw[:CALIB_SAMPLES])
        x = x if isinstance(x, dict) else {next(iter(feeds)): x}
        if set(feeds) <= set(x):
            return {k: np.ascontiguousarray(x[k]).astype(feeds[k].dtype) for k in feeds}
    return {k: v[:CALIB_SAMPLES] for k, v in feeds.items()}


def build(cfg, target: str, precision: str, src: Source, out_dir: Path) -> list[Path]:
    """Write the target file(s) into ``out_dir``; the runnable file first (an IR's .bin second)."""
    from edgecli import runtimes

    backend = runtimes.require(TARGETS[target][0])
    with runtimes.stdout_to_stderr():  # converters print progress; stdout is for results
        return _build(cfg, backend, target, precision, src, out_dir / file_name(target, precision))


def _build(cfg, backend, target: str, precision: str, src: Source, out: Path) -> list[Path]:
    if target == "openvino":
        backend.convert(src.onnx, out, precision=precision, calib=src.calib, text=src.text)
        return [out, out.with_suffix(".bin")]
    import torch

    module = src.module(cfg)
    example = tuple(torch.from_numpy(np.ascontiguousarray(v[:1])) for v in src.feeds.values())
    calib = [tuple(torch.from_numpy(np.ascontiguousarray(v[i:i + 1])) for v in src.calib.values())
             for i in range(len(next(iter(src.calib.values()))))]
    try:
        backend.convert(module, example, out, precision=precision, calib=calib)
    except (ConfigError, CheckFailed):
        raise
    except Exception as e:  # noqa: BLE001 - converters raise anything; one line for the user
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckFailed(f"export: converting to {target} ({precision}) failed ({msg})") from None
    return [out]


def run_file(path: Path, backend: str, precision: str, feeds: dict, batch: int = 64) -> np.ndarray:
    """First output of ``path`` over ``feeds`` through the runtime layer, batched."""
    return run_session(open_file(path, backend, precision), feeds, batch)


def open_file(path: Path, backend: str, precision: str):
    from edgecli import runtimes

    return runtimes.require(backend).open(path, threads=1, precision=precision)


def ran_precision(sess) -> str:
    """What the session really computes in (OpenVINO reports its compiled inference precision)."""
    return getattr(sess, "ran_precision", None) or sess.precision


def run_session(sess, feeds: dict, batch: int = 64) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    outs = [sess.run({k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs).astype(np.float64)


def gate(src: Source, got: np.ndarray, precision: str, pc) -> dict:
    """Parity of ``got`` against the float reference: the numbers and passed/why (see the module doc)."""
    ref = src.ref
    res: dict = {"samples": int(len(ref)), "max_abs_diff": float(np.max(np.abs(ref - got))) if ref.size else 0.0}
    reduced = precision not in ("fp32", "as-input")
    why = []
    if src.embed:
        num = np.sum(ref * got, axis=1)
        cos = num / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
        res.update(min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))
        if reduced and cos.min() < 1.0 - src.max_drop:
            why.append(f"min cosine {cos.min():.4f} < {1.0 - src.max_drop:.4f}")
    elif ref.ndim == 2 and ref.shape[1] > 1:
        agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
        res["top1_agreement"] = agree
        if src.labels is not None:
            a_ref = float(np.mean(ref.argmax(1) == src.labels))
            a_got = float(np.mean(got.argmax(1) == src.labels))
            res.update(reference_accuracy=a_ref, accuracy=a_got, accuracy_drop=a_ref - a_got)
            if reduced and a_ref - a_got > src.max_drop + 1e-12:
                why.append(f"accuracy drop {a_ref - a_got:.4f} > {src.max_drop:.4f}")
        if reduced and agree < pc.min_agreement_quantized:
            why.append(f"top-1 agreement {agree:.4f} < {pc.min_agreement_quantized}")
        if not reduced and agree < 1.0:
            why.append(f"top-1 agreement {agree:.4f} < 1")
    if not reduced and res["max_abs_diff"] > pc.atol:
        why.append(f"max abs diff {res['max_abs_diff']:.3g} > atol {pc.atol:g}")
    res.update(mode="reduced" if reduced else "float", passed=not why, why="; ".join(why) or None)
    return res


def entry(target: str, precision: str, files: list[Path], parity: dict, ran: str | None = None) -> dict:
    """The card's record of one target: file(s), sha256, runtime + version, precision, parity."""
    from edgecli import runtimes
    from edgecli.artifacts import sha256_file

    backend = TARGETS[target][0]
    return {"target": target, "file": files[0].name, "runtime": backend, "version": runtimes.get(backend).version(),
            "precision": precision, **({"ran_precision": ran} if ran else {}),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
            "bytes": sum(p.stat().st_size for p in files), "parity": parity}


def build_checked(cfg, target: str, precision: str, src: Source, out_dir: Path) -> tuple[list[Path], dict, str]:
    """(the target's files, its gate record, the precision its runtime really computed in)."""
    files = build(cfg, target, precision, src, out_dir)
    sess = open_file(files[0], TARGETS[target][0], precision)
    got = run_session(sess, src.feeds)
    return files, gate(src, got, precision, cfg.export.parity), ran_precision(sess)


def onnx_entries(files: dict, quantized: bool, parity: dict | None, precision: str | None = None) -> list[dict]:
    """The export's own files as card targets (their parity is the export's, against its input);
    ``precision`` names a quantized model's kind ("int8", "fp16"; default "int8")."""
    from edgecli import runtimes

    version = runtimes.get("onnxruntime").version()
    prec = (precision or "int8") if quantized else "fp32"
    out = []
    for target, name in (("onnx", "model.onnx"), ("ort", "model.ort")):
        if name in files:
            out.append({"target": target, "file": name, "runtime": "onnxruntime", "version": version,
                        "precision": prec, "files": {name: files[name]}, "bytes": files[name]["bytes"],
                        "parity": parity})
    return out


def card_for(path: Path) -> dict:
    """The export card beside a target file (what infer feeds it by): card.json in its directory."""
    from edgecli.safeio import read_user_bytes

    card_path = Path(path).parent / "card.json"
    if not card_path.is_file():
        raise ArtifactError(f"{path}: no card.json beside it; a {Path(path).suffix} file carries no preprocessing "
                            "of its own", hint="run it from its export directory (edgecli export writes both)")
    try:
        card = json.loads(read_user_bytes(card_path, "model card", 16 << 20, ArtifactError))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{card_path}: not valid JSON") from None
    if not isinstance(card, dict):
        raise ArtifactError(f"{card_path}: not a JSON object")
    return card


def tables(card: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, columns, rows) for the export stage's output: the targets, and auto's choice."""
    out = []
    extra = [t for t in card.get("targets", []) if t.get("file") not in ("model.onnx", "model.ort")]
    if extra:
        out.append(("export targets", ["file", "runtime", "precision", "bytes", "parity"],
                    [[t["file"], f"{t['runtime']} {t['version']}", _precision_text(t), t["bytes"],
                      _parity_text(t["parity"])] for t in extra]))
    auto = card.get("auto")
    if auto:
        out.append((f"auto: {auto['chosen']} ({auto['protocol']})",
                    ["candidate", "p50 ms", f"vs {auto.get('baseline', 'onnx')}", "bytes", "accuracy / min cos",
                     "verdict"],
                    [[r["candidate"], f"{r['p50_ms']:.4f}" if "p50_ms" in r else "-",
                      f"{r['vs_onnxruntime']:.2f}x" if r.get("vs_onnxruntime") else "-", r.get("bytes", "-"),
                      _parity_text(r.get("parity") or {}), r["why"]] for r in auto["rows"]]
                    # a runtime that is not installed (or cannot take this model): its one-line reason
                    + [[n.partition(" ")[0], "-", "-", "-", "-", n.partition(" ")[2]] for n in auto.get("notes") or []]))
    return out


def _precision_text(t: dict) -> str:
    ran = t.get("ran_precision")
    return t["precision"] if not ran or ran == t["precision"] else f"{t['precision']} (ran {ran})"


def _parity_text(p: dict) -> str:
    if "min_cosine" in p:
        return f"min cos {p['min_cosine']:.4f}"
    if "accuracy" in p:
        return f"acc {p['accuracy']:.4f} (drop {p['accuracy_drop']:+.4f})"
    if "top1_agreement" in p:
        return f"top-1 agree {p['top1_agreement']:.4f}, max diff {p['max_abs_diff']:.2g}"
    return "-"


class _Port:
    def __init__(self, name: str, shape, type_: str):
        self.name, self.shape, self.type = name, list(shape), type_


class InferSession:
    """A runtime-layer session behind the ONNX Runtime calls infer makes (``run(None, feeds)``,
    ``get_inputs``, ``get_outputs``), with the card's input names, shapes and dtypes."""

    def __init__(self, sess, card: dict):
        self.sess = sess
        self.backend, self.precision = sess.backend, sess.precision
        self._in = [_Port(i["name"], i["shape"], f"tensor({_ORT_TYPE.get(i['dtype'], 'float')})")
                    for i in card.get("inputs") or []]
        outs = card.get("outputs") or [{"name": o.name, "shape": list(o.shape), "dtype": "float32"} for o in sess.outputs]
        self._out = [_Port(o["name"], o["shape"], f"tensor({_ORT_TYPE.get(o.get('dtype'), 'float')})") for o in outs]

    def get_inputs(self):
        return self._in

    def get_outputs(self):
        return self._out

    def run(self, _names, feeds: dict):
        return self.sess.run(feeds)


_ORT_TYPE = {"float32": "float", "float64": "double", "float16": "float16", "int64": "int64", "int32": "int32",
             "uint8": "uint8", "int8": "int8", "bool": "bool"}


def open_for_infer(path: Path, backend: str, threads: int) -> tuple[InferSession, dict]:
    """(session, card) for a target file: the runtime named, or by suffix; the card beside the file."""
    from edgecli import runtimes

    card = card_for(path)
    name = Path(path).name
    rec = next((t for t in card.get("targets", []) if t.get("file") == name), None)
    precision = rec.get("precision") if rec else None
    sess = runtimes.require(backend).open(path, threads=threads, precision=precision)
    return InferSession(sess, card), card


_TARGET_PROBE = r"""
try:
    import numpy as np
    from edgecli.errors import ConfigError, EdgeError
    from edgecli.runtimes.targets import open_for_infer
    sess, card = open_for_infer(sys.argv[1], sys.argv[2], 1)
    feeds = {i["name"]: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i["shape"]], dtype=i["dtype"])
             for i in card.get("inputs") or []}
    sess.run(None, feeds)
    verdict(ok=True)
except ConfigError as e:  # the runtime is not usable here (a broken install): not the model's fault
    verdict(ok=False, config_error=e.message)
except EdgeError as e:
    verdict(ok=False, error=e.message)
except Exception as e:
    verdict(ok=False, error=f"{sys.argv[2]} cannot run this model ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
"""


def probe_target(path: Path, backend: str, *, timeout_s: float = 120.0) -> None:
    """Open ``path`` with ``backend`` and run it once on zeros in a child process (for a target file
    edgecli did not make: a runtime that aborts on a malformed file takes the child down, not edgecli)."""
    import contextlib
    import os
    import subprocess
    import sys

    from edgecli.errors import ModelFileError
    from edgecli.onnxio import PROBE_PRELUDE, child_verdict

    card_for(path)  # no card beside it: the artifact error itself, before any child
    env = {**os.environ, "EDGECLI_PARENT_PID": str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE_PRELUDE + _TARGET_PROBE, str(path), backend],
                              capture_output=True, text=True, errors="replace", timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"{path}: {backend} did not load and run this model within {timeout_s:g} s; refused") from None
    last = ([ln for ln in proc.stdout.splitlines() if ln.startswith("{")] or ["{}"])[-1]
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        if json.loads(last).get("config_error"):
            raise ConfigError(json.loads(last)["config_error"])
    child_verdict(path, proc.returncode, proc.stdout, runtime=backend)


def target_files(rec: dict) -> list[str]:
    """Every file of one card target (OpenVINO's .xml has its .bin), for checks against the manifest."""
    return sorted({rec["file"], *(rec.get("files") or {})})


def target_file(card: dict, export_dir: Path, runtime: str) -> Path:
    """The export bundle's file for ``runtime`` (the auto choice first), or a ConfigError listing what is there."""
    ts = [t for t in card.get("targets", []) if t.get("runtime") == runtime]
    chosen = (card.get("auto") or {}).get("chosen")
    ts.sort(key=lambda t: f"{t['target']}:{t['precision']}" != chosen)
    if not ts:
        have = sorted({t.get("runtime") for t in card.get("targets", [])}) or ["onnxruntime"]
        raise ConfigError(f"infer.runtime: the export bundle has no {runtime} target (it has {', '.join(have)})",
                          hint="add it to export.targets and rerun `edgecli export`")
    name = ts[0].get("file")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"{export_dir / 'card.json'}: target file {str(name)[:80]!r} is not a plain file name "
                            "inside the export bundle; refused")
    return export_dir / name


def bench_entries(export_dir: Path, wanted: list[str] | None) -> tuple[list[dict], list[str]]:
    """(the export bundle's non-ONNX targets bench gives a row each, notes).

    ``wanted`` is bench.runtimes: None means every target in the bundle (a runtime that is not
    installed is then skipped with a note); a runtime named there must be installed (ConfigError,
    naming the extra) and present in the bundle (a note otherwise). model.onnx is the
    onnxruntime row already.
    """
    from edgecli import runtimes

    card = card_for(export_dir / "model.onnx")
    out, notes = [], []
    for name in wanted or []:
        runtimes.require(name)
    for t in card.get("targets", []):
        if t.get("file") in ("model.onnx", "model.ort") or (wanted is not None and t["runtime"] not in wanted):
            continue
        why = runtimes.get(t["runtime"]).unavailable()
        if why:
            notes.append(f"export {t['target']}:{t['precision']} not benched: {why}")
            continue
        out.append({"label": f"export {t['target']}:{t['precision']}", "path": export_dir / t["file"],
                    "files": target_files(t),
                    "runtime": t["runtime"], "precision": t["precision"], "bytes": t["bytes"],
                    "input_names": [i["name"] for i in card.get("inputs") or []],
                    "embedder": "min_cosine" in (t.get("parity") or {})})
    for name in wanted or []:
        if name != "onnxruntime" and not any(e["runtime"] == name for e in out):
            notes.append(f"bench.runtimes: the export bundle has no {name} target")
    return out, notes
