"""Post-training quantization in ONNX Runtime, chosen by measurement: one quantize step's job.

Every candidate (static QDQ/QOperator, dynamic, FP16, INT8 and INT4 weight-only) is scored on held-out
data (accuracy, or fidelity to the input model when no labels fit) and timed in ONNX Runtime at
batch 1 side by side with its input. A candidate is kept only when it holds the accuracy budget
and, for the latency objective, is really faster than its input on this machine: INT8 is slower
than FP32 for some models here (MEASURED.md), so nothing is applied blindly.

Each candidate carries the ``QuantizeConfig`` it is built from (the step's own, or a copy for one of
``auto``'s modes); how each mode builds lives in the table ``edgecli.compression.quantize_modes.MODES``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecli.compression import rounded as _r
from edgecli.compression.quantize_modes import MODES, Sources, dynamic_ops, pre_process, quantized_nodes
from edgecli.errors import DataError
from edgecli.onnxio import model_inputs

if TYPE_CHECKING:
    from edgecli.config import QuantizeConfig

# A candidate must beat its input by this much to count as faster: timings here move a few
# percent between rounds, and a tie is not worth the accuracy risk of a quantized model.
MIN_SPEEDUP = 0.03
MAX_BACKOFF_TRIES = 8
# `auto` tries INT8 weight-only with block 128 (faster) and the step's block_size (default 32: closer to FP32)
INT8_WO_AUTO_BLOCK = 128

_CLASS_NAMES = ("logit", "prob", "score", "class", "label", "pred")
# an unnamed [N, K] output wider than this is read as an embedding (sentence embedders have 128-1024 dims)
MAX_UNNAMED_CLASSES = 32


def output_kind(model, info: dict | None, num_classes: int | None) -> tuple[str, str]:
    """("class_scores" | "embedding", why): what the model's first output is, decided from the output.

    The fidelity metric follows from it, never from whether labels happen to exist: top-1 of a
    384-d embedding means nothing (a static-INT8 MiniLM kept "fidelity" 0.0 at min cosine 0.36 and
    was published). Class scores are a rank-2 output [N, K>=2] that edgecli's metadata names logits,
    whose K equals the data's class count, whose name says so, or whose K is at most 32; anything else
    is compared by cosine.
    """
    names = (info or {}).get("output_names")
    if names == ["embedding"]:
        return "embedding", "the model's metadata names its output 'embedding'"
    out = model.graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in out.type.tensor_type.shape.dim]
    k = dims[-1] if dims else None
    if len(dims) != 2 or k is None or k < 2:
        return "embedding", f"output {out.name} has shape {['N' if d is None else d for d in dims]}, not class scores [N, K]"
    if names == ["logits"]:
        return "class_scores", "the model's metadata names its output 'logits'"
    if num_classes is not None and k == num_classes:
        return "class_scores", f"output {out.name} [N, {k}] matches the data's {num_classes} classes"
    if any(w in out.name.lower() for w in _CLASS_NAMES):
        return "class_scores", f"output {out.name} [N, {k}] is named as class scores"
    if k <= MAX_UNNAMED_CLASSES:
        return "class_scores", f"output {out.name} [N, {k}]: few enough values to be class scores"
    return "embedding", (f"output {out.name} [N, {k}] is wider than {MAX_UNNAMED_CLASSES}, not named as class scores "
                         "and matches no class count: compared by cosine (the stricter reading)")




# --------------------------------------------------------------------------- scoring and timing


class Scorer:
    """Scores a model on fixed inputs: accuracy when labels are known, else fidelity to a reference.

    ``score`` is the number the accuracy budget applies to: accuracy, or top-1 agreement with the
    input model (whose own score is then 1.0).
    """

    def __init__(self, feeds: dict[str, np.ndarray], labels: np.ndarray | None, threads: int, reference=None,
                 embedding: bool = False):
        self.feeds, self.labels, self.threads = feeds, labels, threads
        self.reference = reference
        # an embedding model's fidelity is the worst cosine to the reference (top-1 of a vector means nothing)
        self.embedding = embedding
        self.metric = "accuracy" if labels is not None else ("cosine_min" if embedding else "fidelity")

    def outputs(self, path: Path) -> np.ndarray:
        from edgecli.runtimes.ort import make_session, run_batched

        sess = make_session(path, threads=self.threads)
        names = [i.name for i in sess.get_inputs()]
        fixed_batch = sess.get_inputs()[0].shape[0] == 1
        return run_batched(sess, {k: self.feeds[k] for k in names}, 1 if fixed_batch else 256).astype(np.float32)

    def score(self, path: Path) -> dict:
        from edgecli.metrics import cosine_similarity, top1_agreement

        out = self.outputs(path)
        if not np.isfinite(out).all():
            return {"score": 0.0, "nonfinite_outputs": True}
        if self.labels is not None:
            acc = float((out.reshape(len(out), -1).argmax(-1) == self.labels).mean())
            res = {"score": acc, "accuracy": acc}
        else:
            res = {}
        if self.reference is not None:
            ref = self.reference
            agree = top1_agreement(ref.reshape(len(ref), -1), out.reshape(len(out), -1))
            if ref.reshape(len(ref), -1).shape[1] == 1:  # a scalar regressor: per-sample cosine is only a sign
                cos = cosine_similarity(ref.reshape(1, -1), out.reshape(1, -1))
            else:
                cos = cosine_similarity(ref, out)
            res.update(top1_agreement=agree, cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
            if self.labels is None:
                res["score"] = float(cos.min()) if self.embedding else agree
        return res


def time_p50(paths: list[Path], feed1: dict[str, np.ndarray], threads: int, *, rounds: int = 9,
             round_s: float = 0.08, min_runs: int = 10, sessions: int = 3) -> list[float]:
    """p50 latency in ms of each model at batch 1, measured interleaved (round-robin) so that
    load from other processes hits every model alike; ratios between them are what counts.

    Each model gets ``sessions`` sessions, used in turn round by round: one session's p50 of a
    model can sit 10-20% off another session's of the same file here (where its buffers landed),
    enough to pick a slower candidate; rotating several averages that out.
    """
    from edgecli.runtimes.ort import make_session

    pools = [[make_session(p, threads=threads) for _ in range(sessions)] for p in paths]
    runs = []
    for pool in pools:  # warm-up, and an estimate of how many runs fill one round
        for s in pool:
            for _ in range(5):
                s.run(None, feed1)
        s = pool[0]
        t0 = time.perf_counter()
        for _ in range(5):
            s.run(None, feed1)
        per = (time.perf_counter() - t0) / 5
        runs.append(max(min_runs, min(2000, int(round_s / max(per, 1e-6)))))
    samples: list[list[float]] = [[] for _ in pools]
    for r in range(rounds):
        for i, pool in enumerate(pools):
            s = pool[r % len(pool)]
            for _ in range(runs[i]):
                t0 = time.perf_counter()
                s.run(None, feed1)
                samples[i].append(time.perf_counter() - t0)
    return [statistics.median(x) * 1000.0 for x in samples]


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One model a quantize step builds and measures; ``config`` is None for the FP32 input itself."""

    name: str
    config: QuantizeConfig | None = None  # of one concrete mode (never "auto")
    path: Path | None = None
    bytes: int | None = None
    scores: dict = field(default_factory=dict)
    p50_ms: float | None = None
    error: str | None = None
    applicable: bool = True
    chosen: bool = False
    reason: str = ""
    failed: list[str] = field(default_factory=list)  # constraints this candidate broke

    @property
    def mode(self) -> str:
        return self.config.mode if self.config is not None else "fp32"

    @property
    def excluded_nodes(self) -> list[str]:
        return list(self.config.nodes_to_exclude) if self.config is not None else []

    @property
    def score(self) -> float | None:
        return self.scores.get("score")

    def excluding(self, name: str, nodes: list[str]) -> Candidate:
        """A new candidate of the same mode and options that leaves ``nodes`` (besides its own) in FP32."""
        return Candidate(name, self.config.model_copy(update={"nodes_to_exclude": self.excluded_nodes + nodes}))

    def to_json(self, base_score: float | None, base_p50: float | None) -> dict:
        d = {
            "name": self.name, "mode": self.mode,
            "options": MODES[self.mode].record(self.config) if self.config is not None else {},
            "excluded_nodes": self.excluded_nodes,
            "bytes": self.bytes, **{k: v for k, v in self.scores.items() if k != "score"},
            "score": self.score, "p50_ms": _r(self.p50_ms),
            "accuracy_drop": _r(base_score - self.score) if base_score is not None and self.score is not None else None,
            "latency_ratio": _r(self.p50_ms / base_p50) if self.p50_ms and base_p50 else None,
            "applicable": self.applicable, "error": self.error,
            "chosen": self.chosen, "failed_constraints": self.failed, "reason": self.reason,
        }
        return d


@dataclass
class QuantizeOutcome:
    chosen: Candidate | None  # None: the input model is kept
    candidates: list[Candidate]
    input: Candidate
    verdict: str
    failed_constraint: str | None
    sensitivity: list[dict]
    notes: list[str]
    best_rejected: Candidate | None = None


class QuantizeJob:
    """One `quantize` step: build candidates for its mode (``auto``: every mode), score, time, choose.

    ``src`` is the step's input model (FP32 ONNX, self-contained); ``work`` a scratch directory;
    ``opts`` the step's ``QuantizeConfig``, which each candidate copies with its own mode and options.
    """

    def __init__(self, src: Path, work: Path, opts: QuantizeConfig, *, scorer: Scorer, calib: dict[str, np.ndarray] | None,
                 calib_problem: str | None, feed1: dict[str, np.ndarray], threads: int,
                 max_drop: float | None, objective: str, key: str, log=lambda m: None,
                 min_cosine: float | None = None):
        self.src, self.work, self.opts = Path(src), Path(work), opts
        # the guard: min_cosine for embeddings/regressors (score is the worst cosine), else max_drop
        self.min_cosine = min_cosine if scorer.embedding else None
        self.scorer, self.calib, self.calib_problem = scorer, calib, calib_problem
        self.feed1, self.threads, self.max_drop, self.objective = feed1, threads, max_drop, objective
        self.key, self.log = key, log
        self.notes: list[str] = []
        self.sensitivity: list[dict] = []
        self._n = 0

    # ----------------------------------------------------------------- building
    def _new_path(self, tag: str) -> Path:
        self._n += 1
        return self.work / f"cand{self._n:02d}-{tag}.onnx"

    def _build(self, cand: Candidate, prepped: Path) -> Candidate:
        mode = MODES[cand.mode]
        dst = self._new_path(cand.mode)
        try:
            if mode.needs_calibration and self.calib is None:
                raise DataError(self.calib_problem or f"{self.key}.calibration.data: no calibration data")
            mode.build(Sources(self.src, prepped, self.work, self.inputs, self.calib), cand.config, dst)
            cand.path = dst
            from edgecli.onnxio import model_bytes

            cand.bytes = model_bytes(dst)
            cand.scores = self.scorer.score(dst)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a mode that fails on this graph is reported, not fatal
            cand.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            cand.reason = f"failed to build: {cand.error}"
            cand.path = None
        return cand

    def _drop(self, cand: Candidate) -> float | None:
        if cand.score is None or self.base.score is None:
            return None
        return self.base.score - cand.score

    @property
    def guard(self) -> tuple[str, float] | None:
        if self.min_cosine is not None:
            return "min_cosine", self.min_cosine
        return ("max_accuracy_drop", self.max_drop) if self.max_drop is not None else None

    def _holds(self, cand: Candidate) -> bool:
        if self.min_cosine is not None:
            return cand.score is not None and cand.score >= self.min_cosine - 1e-9
        d = self._drop(cand)
        return d is not None and (self.max_drop is None or d <= self.max_drop + 1e-9)

    def _guard_reason(self, cand: Candidate) -> str:
        if cand.score is None:
            return "not scored"
        if self.min_cosine is not None:
            return f"min cosine {cand.score:.4f} < min_cosine {self.min_cosine} (guard)"
        return f"{self.scorer.metric} drop {self._drop(cand):.4f} > max_accuracy_drop {self.max_drop} (guard)"

    # ----------------------------------------------------------------- plan
    def _plan(self, model) -> list[Candidate]:
        o = self.opts
        auto = o.mode == "auto"
        cands = self._auto_plan(model) if auto else [Candidate(MODES[o.mode].label(o), o)]
        for c in cands:  # a mode that cannot run on this graph is listed, not tried
            why = MODES[c.mode].applies(model)
            if why and c.applicable:
                c.applicable, c.reason = False, f"{'not tried' if auto else 'not applicable'}: {why}"
        return cands

    def _auto_plan(self, model) -> list[Candidate]:
        """`auto`: every mode, each as a copy of the step's config; each is measured, none assumed."""
        o = self.opts
        as_ = lambda mode, **kw: o.model_copy(update={"mode": mode, **kw})  # noqa: E731
        cands = [Candidate("static qdq per-channel", as_("static", format="qdq", per_channel=True)),
                 Candidate("static qdq per-tensor", as_("static", format="qdq", per_channel=False))]
        if o.format == "qoperator":
            cands.append(Candidate("static qoperator", as_("static", format="qoperator")))
        dyn_ops = dynamic_ops(model)
        if dyn_ops:
            cands.append(Candidate("dynamic " + "/".join(dyn_ops),
                                   as_("dynamic", per_channel=True, op_types=o.op_types or dyn_ops)))
        else:
            c = Candidate("dynamic", as_("dynamic", per_channel=True))
            c.applicable, c.reason = False, ("not tried: no MatMul/Gemm/RNN/attention ops (dynamic Conv runs as "
                                             "ConvInteger, 7-11x slower here)")
            cands.append(c)
        cands.append(Candidate("fp16", as_("fp16")))
        cands.append(Candidate("int4 weight-only", as_("int4_weight_only")))
        # INT8 weight-only: block 128 (faster) and the step's block_size (closer to FP32)
        for block in sorted({INT8_WO_AUTO_BLOCK, o.block_size}, reverse=True):
            cands.append(Candidate(f"int8 weight-only block {block}", as_("int8_weight_only", block_size=block)))
        return cands

    # ----------------------------------------------------------------- backoff
    def _backoff(self, first: Candidate, prepped: Path) -> list[Candidate]:
        """Sensitivity pass: re-quantize with each quantized node left in FP32, rank the nodes by
        the score that brings back, then exclude the worst ones cumulatively until the budget holds.

        Under ``objective: size`` the nodes that bring score back are ranked by score per byte they
        add instead: MiniLM's embedding table brings back most cosine but costs 35 MB in FP32, while
        an FFN MatMul brings back almost as much for 1.8 MB. Latency is not known per probe (timing
        each would be slow and noisy), so under ``objective: latency`` the rank is the score alone."""
        nodes = [n for n in quantized_nodes(first.path) if n not in first.excluded_nodes]
        if not nodes:
            return []
        self.log(f"sensitivity pass over {len(nodes)} quantized nodes")
        gains = []
        for n in nodes:
            probe = first.excluding(f"probe {n}", [n])
            self._build(probe, prepped)
            if probe.path is None:
                continue
            gains.append((probe.score, n, probe.bytes - first.bytes))
            with contextlib.suppress(OSError):
                probe.path.unlink()

        def rank(t):
            gain, extra = t[0] - first.score, t[2]
            if self.objective == "size":
                return (0, -gain / max(extra, 1024)) if gain > 0 else (1, -gain)
            return (0, -gain)

        gains.sort(key=rank)
        self.sensitivity = [{"node": n, "score_when_kept_fp32": _r(s), "gain": _r(s - first.score), "extra_bytes": b}
                            for s, n, b in gains]
        ranked = [n for _, n, _ in gains]
        out = []
        k, tries = 1, 0
        while k < len(ranked) + 1 and tries < MAX_BACKOFF_TRIES:
            c = first.excluding(f"{first.name} -{k} node{'s' if k > 1 else ''}", ranked[:k])
            self._build(c, prepped)
            out.append(c)
            tries += 1
            if c.path is not None and self._holds(c):
                break
            k = k + 1 if k < 4 else int(k * 1.5)
        return out

    # ----------------------------------------------------------------- run
    def run(self) -> QuantizeOutcome:
        import onnx

        from edgecli.onnxio import model_bytes

        model = onnx.load(str(self.src))
        self.inputs = model_inputs(model)
        self.base = Candidate("input (fp32)", path=self.src, bytes=model_bytes(self.src))
        self.base.scores = self.scorer.score(self.src)
        prepped = self.work / "preprocessed.onnx"
        self.notes += pre_process(self.src, prepped)
        cands = self._plan(model)
        for c in cands:
            if c.applicable:
                self.log(f"building candidate: {c.name}")
                self._build(c, prepped)
        built = [c for c in cands if c.path is not None]
        # accuracy-aware: if no INT8 candidate holds the budget, back off the first one (static
        # first) by leaving its most sensitive nodes in FP32
        # the INT8 candidate closest to the guard is backed off (static first on a tie): on an external
        # MiniLM static INT8 kept min cosine 0.36 while dynamic kept 0.98, one sensitive node short of 0.99
        int8 = [c for c in built if c.mode == "static"] + [c for c in built if c.mode == "dynamic"]
        # an INT8 weight-only candidate that holds the guard already is an INT8 model that holds it
        holds8 = any(self._holds(c) for c in int8 + [c for c in built if c.mode == "int8_weight_only"])
        if self.guard is not None and int8 and not holds8:
            first = max(int8, key=lambda c: c.score if c.score is not None else float("-inf"))
            cands += self._backoff(first, prepped)
            built = [c for c in cands if c.path is not None]
        # latency-aware: time every built candidate side by side with the input
        self.log(f"timing {len(built) + 1} models at batch 1, {self.threads} thread(s)")
        p50s = time_p50([self.src] + [c.path for c in built], self.feed1, self.threads)
        self.base.p50_ms = p50s[0]
        for c, p in zip(built, p50s[1:], strict=False):
            c.p50_ms = p
        return self._choose(cands)

    def _choose(self, cands: list[Candidate]) -> QuantizeOutcome:
        forced = bool(self.opts.force) and self.opts.mode != "auto"
        base = self.base
        guard = self.guard[0] if self.guard else "max_accuracy_drop"
        ok: list[Candidate] = []
        for c in cands:
            if c.path is None:
                continue
            if not self._holds(c):
                c.failed.append(guard)
                c.reason = self._guard_reason(c)
                if not forced:
                    continue
                c.reason += "; kept: force: true"
            slower = c.p50_ms >= base.p50_ms * (1 - MIN_SPEEDUP)
            if self.objective == "latency" and slower and not forced:
                c.failed.append("latency")
                c.reason = (f"not faster than its input ({c.p50_ms:.4f} vs {base.p50_ms:.4f} ms, "
                            f"{c.p50_ms / base.p50_ms:.2f}x; needs < {1 - MIN_SPEEDUP:.2f}x)")
                continue
            if self.objective == "size" and c.bytes >= base.bytes:
                c.failed.append("size")
                c.reason = f"not smaller than its input ({c.bytes} vs {base.bytes} bytes)"
                continue
            ok.append(c)
        key = (lambda c: (c.p50_ms, c.bytes)) if self.objective == "latency" else (lambda c: (c.bytes, c.p50_ms))
        ok.sort(key=key)
        chosen = ok[0] if ok else None
        for c in ok[1:]:
            c.reason = (f"holds every constraint but {chosen.name} is "
                        + (f"faster ({chosen.p50_ms:.4f} vs {c.p50_ms:.4f} ms)" if self.objective == "latency"
                           else f"smaller ({chosen.bytes} vs {c.bytes} bytes)"))
        failed_constraint = None
        best_rejected = None
        if chosen is not None:
            chosen.chosen = True
            ratio = chosen.p50_ms / base.p50_ms
            held = (f"min cosine {chosen.score:.4f}" if self.min_cosine is not None
                    else f"{self.scorer.metric} drop {self._drop(chosen):.4f}")
            chosen.reason = (f"best by {self.objective}: {ratio:.2f}x input latency, "
                             f"{chosen.bytes / base.bytes:.2f}x size, {held}")
            if forced and self.objective == "latency" and chosen.p50_ms >= base.p50_ms * (1 - MIN_SPEEDUP):
                chosen.reason += f" (forced: mode {self.opts.mode} kept although it is not faster than its input)"
            verdict = f"chose {chosen.name}"
        else:
            tried = [c for c in cands if c.path is not None]
            fails = [f for c in tried for f in c.failed]
            if not tried:
                failed_constraint = "no candidate could be built"
            elif all(guard in c.failed for c in tried):
                failed_constraint = guard
            else:
                failed_constraint = max(set(fails), key=fails.count) if fails else "none"
            verdict = ("kept FP32 input: " + (f"no candidate held {failed_constraint}" if tried
                                              else failed_constraint))
            if tried:
                best_rejected = max(tried, key=lambda c: (c.score or 0.0, -(c.p50_ms or 0)))
        return QuantizeOutcome(chosen, cands, base, verdict, failed_constraint, self.sensitivity, self.notes,
                               best_rejected)

