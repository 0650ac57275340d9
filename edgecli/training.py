"""The one training loop: fit, evaluate, checkpoint, resume, DDP under torchrun.

Used by the train stage and by compression (pruning fine-tuning, distillation), which pass
their own loss through ``loss_fn``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecli.errors import CheckFailed, ConfigError, ModelFileError

# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> Dist:
    """Rank information from torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device, timeout_s: int) -> Dist:
    d = dist_info()
    if not d.enabled:
        return d
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    return d


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or stalled (gloo/NCCL raise RuntimeError)."""
    import torch.distributed as tdist

    if isinstance(e, tdist.DistError):
        return True
    msg = str(e)
    return any(k in msg for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out"))


def first_line(e: BaseException) -> str:
    """The first line of a torch.distributed error, without gloo's source-file prefix, for one-line messages."""
    import re

    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo prefixes its source file:line
    return line.split(". ")[0][:200]


# --------------------------------------------------------------------------- setup helpers


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """train.device as a torch device; ``cuda``/``auto`` take GPU ``local_rank`` (one GPU per torchrun rank)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: '{name}' requested but no CUDA device is available (use auto or cpu)")
        count = torch.cuda.device_count()
        if name == "cuda":
            if local_rank >= count:
                raise ConfigError(f"train.device: cuda for local rank {local_rank}, but this node has only {count} "
                                  "CUDA device(s); start at most that many processes per node (--nproc_per_node)")
            return torch.device(f"cuda:{local_rank}")
        idx = int(name.split(":")[1])
        if idx >= count:
            raise ConfigError(f"train.device: '{name}' but only {count} CUDA device(s) present")
        # NCCL cannot run two ranks of one group on one GPU: pinning a GPU only makes sense per process.
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"train.device: '{name}' pins every torchrun process to one GPU; use cuda or auto "
                              "(rank i takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
        return torch.device(name)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device: 'mps' requested but not available")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.amp on ``device``; None (float32) off CUDA, where amp does not apply."""
    if amp in (None, "none") or device.type != "cuda":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.amp: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def apply_freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Freeze parameters whose names start with any prefix; return how many tensors were frozen."""
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    frozen = 0
    for prefix in prefixes:
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            from edgecli.registry import did_you_mean

            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"train.freeze: '{prefix}' matches no parameter{did_you_mean(prefix.split('.')[0], tops)}; "
                              f"top-level modules: {', '.join(tops)}")
    for n, p in model.named_parameters():
        if any(n == pr or n.startswith(pr.rstrip(".") + ".") for pr in prefixes):
            p.requires_grad_(False)
            frozen += 1
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("train.freeze: every parameter is frozen; nothing would train")
    return frozen


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict without ever unpickling: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe payloads: refused, never retried unsafely
        raise ModelFileError(
            f"{path}: refused: not a plain tensor checkpoint ({type(e).__name__}); "
            "edgecli never unpickles arbitrary objects — convert it to .safetensors"
        ) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: does not hold a state dict of tensors")
    return obj


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy tensors whose name and shape match (transfer learning); return (loaded, skipped)."""
    own = model.state_dict()
    loaded, skipped = [], []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            own[k] = v.to(own[k].dtype)
            loaded.append(k)
        else:
            skipped.append(k)
    model.load_state_dict(own)
    return loaded, skipped


def class_weights(y: np.ndarray, num_classes: int, spec) -> torch.Tensor | None:
    if isinstance(spec, list):
        if len(spec) != num_classes:
            raise ConfigError(f"train.class_weights: give {num_classes} weights (one per class), got {len(spec)}")
        return torch.tensor(spec, dtype=torch.float32)
    if spec == "balanced":
        counts = np.bincount(y, minlength=num_classes).astype(np.float64)
        w = len(y) / (num_classes * np.maximum(counts, 1))
        return torch.tensor(w, dtype=torch.float32)
    return None


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, x, batch_size: int = 512, device: torch.device | None = None) -> np.ndarray:
    """Logits for ``x`` (an array, or a dict of named arrays for multi-input models)."""
    model.eval()
    device = device or next(model.parameters()).device
    outs = []
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        for i in range(0, n, batch_size):
            batch = {k: torch.as_tensor(v[i : i + batch_size]).to(device) for k, v in x.items()}
            outs.append(model(**batch).float().cpu().numpy())
    else:
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.as_tensor(x[i : i + batch_size]).to(device)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, x, y: np.ndarray, num_classes: int, device=None) -> tuple[dict, np.ndarray]:
    from edgecli.metrics import classification_metrics

    logits = predict_logits(model, x, device=device)
    return classification_metrics(y, logits.argmax(-1), num_classes), logits


def hard_label_loss(cfg, train_y, num_classes: int):
    """The train stage's cross-entropy (class weights, label smoothing) as ``ce(logits, yb)``."""
    return _cross_entropy(cfg.train, train_y, num_classes)


def _cross_entropy(tcfg, train_y, num_classes: int):
    """``ce(logits, yb)`` with train.class_weights and train.label_smoothing; the weights follow the logits' device."""
    w = class_weights(train_y, num_classes, tcfg.class_weights)
    crit = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=tcfg.label_smoothing)

    def ce(logits, yb):
        if crit.weight is not None and crit.weight.device != logits.device:
            crit.to(logits.device)
        return crit(logits, yb)

    return ce


def val_accuracy(model, ctx) -> float:
    """Validation accuracy in PyTorch on the whole validation split of ``ctx`` (a compression context:
    ``ctx.splits``, ``ctx.num_classes``).

    The whole split, like ``ctx.baseline_val_accuracy`` (the train stage's val accuracy), so the
    accuracy drop compares like with like; fine-tuning scores every epoch on it anyway.
    """
    m, _ = evaluate(model, ctx.splits.val.x, ctx.splits.val.y, ctx.num_classes)
    return float(m["accuracy"])


# --------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    privacy: dict | None = None  # DP-SGD: ε spent, δ, noise, clipping (edgecli.privacy.DPSGD.summary)
    federated: dict | None = None  # federated training: clients, rounds, per-round records


class TrainingDiverged(CheckFailed):
    kind = "training diverged"


LossFn = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


def _save_checkpoint(path: Path, state: dict) -> None:
    from edgecli.artifacts import open_own, own_dir, refuse_link

    own_dir(path.parent.parent, "checkpoints")  # never a link: edgecli writes and deletes in there
    own_dir(path.parent, "checkpoints")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    refuse_link(tmp)
    tmp.unlink(missing_ok=True)
    try:
        with os.fdopen(open_own(tmp), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError from its zip writer
        import errno
        import shutil

        tmp.unlink(missing_ok=True)
        full = shutil.disk_usage(path.parent).free < (1 << 20)
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      "No space left on device" if full else f"cannot write checkpoint ({str(e).splitlines()[0][:120]})",
                      str(path)) from None
    refuse_link(path, "its checkpoint")
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict:
    from edgecli.artifacts import refuse_link

    refuse_link(path, "its checkpoint")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{path}: checkpoint unreadable ({type(e).__name__}); rerun without --resume") from None


def _batches(x, idx: np.ndarray):
    if isinstance(x, dict):
        return {k: torch.as_tensor(v[idx]) for k, v in x.items()}
    return torch.as_tensor(x[idx])


def fit(
    model: nn.Module,
    train_x,
    train_y: np.ndarray,
    val_x,
    val_y: np.ndarray,
    tcfg,
    *,
    num_classes: int,
    seed: int,
    epochs: int | None = None,
    lr: float | None = None,
    loss_fn: LossFn | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    desc: str = "train",
    quiet: bool = False,
    device: torch.device | None = None,
    dist: Dist | None = None,
    private=None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights.

    ``tcfg`` is a TrainConfig (optimizer, schedule, early stopping, ...); ``epochs``/``lr``
    override it (fine-tuning). Checkpoints go to ``checkpoint`` after every epoch, atomically;
    ``resume`` continues from it when its fingerprint matches.

    ``val_x=None`` trains without validation and keeps the last epoch (a federated client has no
    held-out split of its own). ``private`` (an ``edgecli.privacy.DPSGD``) makes the step DP-SGD:
    it wraps the model and optimizer with Opacus, draws Poisson-sampled batches and adds the ε
    spent to each epoch's history.
    """
    dist = dist or Dist()
    device = device or torch.device("cpu")
    epochs = epochs if epochs is not None else tcfg.epochs
    lr = lr if lr is not None else tcfg.lr
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(tcfg, params, lr)
    n = len(train_y)
    net = model
    if private is not None:
        if dist.enabled:
            raise ConfigError("train.privacy: DP-SGD under torchrun is not supported; run `edgecli train` "
                              "as one process (or use train.federated with privacy)")
        net, opt = private.attach(model, opt, n, tcfg.batch_size, epochs)
    per_rank_batch = max(1, tcfg.batch_size // dist.world)
    steps_per_epoch = max(1, math.ceil(n / (per_rank_batch * dist.world)))
    sched = _scheduler(tcfg, opt, max(1, epochs * steps_per_epoch))
    if loss_fn is None:
        ce = _cross_entropy(tcfg, train_y, num_classes)

        def loss_fn(logits, xb, yb):  # noqa: E306
            return ce(logits, yb)

    autocast_dtype = amp_dtype(tcfg.amp, device)
    # fp16 has too little range for small gradients: scale the loss; bf16 has float32's range
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    st = _restore(checkpoint, resume, fingerprint, dist, model, opt, sched, private)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts from one model.
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = _Stepper(net, opt, sched, scaler, params, loss_fn, device, autocast_dtype,
                    None if private is not None else tcfg.max_grad_norm, checkpoint, desc)
    patience = tcfg.early_stopping.patience if tcfg.early_stopping else None
    min_delta = tcfg.early_stopping.min_delta if tcfg.early_stopping else 0.0
    t0 = time.time()
    stopped = False
    epoch = st.start_epoch - 1
    with _progress(dist.is_main and not quiet, desc, epochs, st.start_epoch) as prog:
        for epoch in range(st.start_epoch, epochs):
            net.train()
            g = torch.Generator().manual_seed(seed * 1000 + epoch)  # same order after --resume
            batches = private.batches(g) if private is not None else _epoch_order(n, g, dist, per_rank_batch)
            tot_loss, tot_n = step.epoch(train_x, train_y, batches, epoch)
            train_loss = _reduce_mean(tot_loss, tot_n, device, dist)
            val_acc = _validate(model, val_x, val_y, num_classes, device, dist)
            rec = {"epoch": epoch + 1, "train_loss": round(train_loss, 5),
                   "val_accuracy": None if val_x is None else round(val_acc, 5), "lr": opt.param_groups[0]["lr"]}
            if private is not None:
                rec.update(private.spent())
            st.history.append(rec)
            if val_acc > st.best_acc + min_delta or st.best_state is None or val_x is None:
                st.best_acc, st.best_epoch = max(val_acc, st.best_acc), epoch
                st.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if checkpoint is not None and dist.is_main:
                _save_state(checkpoint, st, epoch, model, opt, sched, fingerprint, private)
            prog.update(epoch + 1, train_loss, val_acc, st.best_acc,
                        f"  ε {rec['epsilon']:.2f}" if "epsilon" in rec else "")
            if patience is not None and epoch - st.best_epoch >= patience:
                stopped = True
                break
    if private is not None:
        private.close()
    if st.best_state is not None:
        model.load_state_dict(st.best_state)
    return FitResult(st.best_acc, st.best_epoch + 1, epoch + 1, stopped, st.resumed, st.history, time.time() - t0)


def _optimizer(tcfg, params: list, lr: float) -> torch.optim.Optimizer:
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=tcfg.weight_decay)


def _scheduler(tcfg, opt, total_steps: int):
    """Per-step learning-rate schedule: cosine to zero over ``total_steps``, or constant."""
    if tcfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@dataclass
class _FitState:
    """What a checkpoint carries from one epoch to the next (and across --resume)."""

    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)
    resumed: int | None = None


def _restore(checkpoint: Path | None, resume: bool, fingerprint: str, dist: Dist, model, opt, sched,
             private) -> _FitState:
    """The state to start from: fresh, or the checkpoint's when ``resume`` and its fingerprint matches."""
    st = _FitState()
    ck = None
    if resume and checkpoint is not None and dist.is_main and checkpoint.is_file():
        ck = _load_checkpoint(checkpoint)
    if dist.enabled and resume:
        # Only rank 0 writes checkpoints, and other nodes may not share its disk: it sends them its copy.
        ck = broadcast_object(ck)
    if ck is None:
        return st
    if fingerprint and ck.get("fingerprint") != fingerprint:
        raise ConfigError(f"--resume: the checkpoint in {checkpoint.parent} was made with another config; "
                          "rerun without --resume (or restore the config)")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"])
    if private is not None:
        private.load_state_dict(ck.get("privacy") or {})
    st.start_epoch, st.best_acc, st.best_epoch = int(ck["epoch"]) + 1, float(ck["best_val"]), int(ck["best_epoch"])
    st.best_state = ck.get("best_state")
    st.history = list(ck.get("history", []))
    st.resumed = st.start_epoch
    return st


def _save_state(checkpoint: Path, st: _FitState, epoch: int, model, opt, sched, fingerprint: str, private) -> None:
    _save_checkpoint(checkpoint, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(), "epoch": epoch, "best_val": st.best_acc, "best_epoch": st.best_epoch,
        "best_state": st.best_state, "history": st.history, "fingerprint": fingerprint,
        "privacy": private.state_dict() if private is not None else None,
    })


def _epoch_order(n: int, g: torch.Generator, dist: Dist, per_rank_batch: int):
    """This rank's shuffled batches of sample indices for one epoch."""
    order = torch.randperm(n, generator=g).numpy()
    if dist.enabled:  # DistributedSampler semantics: pad, then stride by rank
        pad = (-len(order)) % dist.world
        order = np.concatenate([order, order[:pad]])[dist.rank :: dist.world]
    return (order[i : i + per_rank_batch] for i in range(0, len(order), per_rank_batch))


def _validate(model: nn.Module, val_x, val_y, num_classes: int, device, dist: Dist) -> float:
    if val_x is None:
        return float("nan")
    if dist.enabled:
        return _distributed_accuracy(model, val_x, val_y, device, dist)
    val_metrics, _ = evaluate(model, val_x, val_y, num_classes, device=device)
    return val_metrics["accuracy"]


@dataclass
class _Stepper:
    """One optimizer step per batch: forward (autocast), a finite-loss check, backward, clip, step."""

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    params: list
    loss_fn: LossFn
    device: torch.device
    autocast_dtype: torch.dtype | None
    max_grad_norm: float | None  # None under DP-SGD, which clips per sample in its optimizer
    checkpoint: Path | None
    desc: str

    def epoch(self, train_x, train_y: np.ndarray, batches, epoch: int) -> tuple[float, int]:
        """Run one epoch's batches; return (summed loss, samples) on this rank."""
        tot_loss, tot_n = 0.0, 0
        for step, idx in enumerate(batches):
            if len(idx) == 0:  # a Poisson draw can be empty (p = (1-q)^n, ~1e-18 at q=0.33, n=100): no step
                continue
            xb = _batches(train_x, idx)
            xb = {k: v.to(self.device) for k, v in xb.items()} if isinstance(xb, dict) else xb.to(self.device)
            yb = torch.as_tensor(train_y[idx]).to(self.device)
            loss = self.step(xb, yb, epoch, step)
            tot_loss += loss.item() * len(idx)
            tot_n += len(idx)
        return tot_loss, tot_n

    def step(self, xb, yb, epoch: int, step: int) -> torch.Tensor:
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = self.net(**xb) if isinstance(xb, dict) else self.net(xb)
            loss = self.loss_fn(logits.float(), xb, yb)
        if not torch.isfinite(loss):
            ck = self.checkpoint
            kept = (f"the last good checkpoint (epoch {epoch}) is kept in {ck.parent}"
                    if ck is not None and ck.is_file() and epoch > 0
                    else "no epoch completed, so no checkpoint was kept")
            raise TrainingDiverged(
                f"{self.desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; {kept}",
                hint="lower train.lr, or set train.max_grad_norm",
            )
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        return loss


def _reduce_mean(total: float, count: int, device, dist: Dist) -> float:
    """The mean over all ranks of a per-rank (sum, count); identical on every rank."""
    if not dist.enabled:
        return total / max(count, 1)
    import torch.distributed as tdist

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t[0] / max(t[1], 1))


def _distributed_accuracy(model: nn.Module, x, y: np.ndarray, device, dist: Dist) -> float:
    """Accuracy on the whole of (x, y), each rank scoring a 1/world stride, summed across ranks.

    Every rank gets the same number, so early stopping and best-epoch choices agree and no rank
    waits forever in a collective the others skipped.
    """
    import torch.distributed as tdist

    # DDP syncs buffers only at the start of a forward: after the last step each rank's BatchNorm
    # running stats saw its own batch. Take rank 0's, so all ranks hold (and rank 0 publishes) one model.
    for b in model.buffers():
        tdist.broadcast(b.data, src=0)
    idx = np.arange(dist.rank, len(y), dist.world)
    sub = {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]
    correct = float((predict_logits(model, sub, device=device).argmax(-1) == y[idx]).sum()) if len(idx) else 0.0
    return _reduce_mean(correct, len(idx), device, dist)


class _Progress:
    """Rich progress bar on a terminal; one plain line per epoch on a pipe or in CI logs."""

    def __init__(self, show: bool, desc: str, epochs: int, start: int):
        self.show, self.desc, self.epochs = show, desc, epochs
        self.bar = None
        if show and sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  val acc {task.fields[acc]}  best {task.fields[best]}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self.task = self.bar.add_task(desc, total=epochs, completed=start, loss="-", acc="-", best="-")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def update(self, epoch: int, loss: float, acc: float, best: float, extra: str = "") -> None:
        if self.bar:
            self.bar.update(self.task, completed=epoch, loss=f"{loss:.4f}", acc=f"{acc:.4f}{extra}", best=f"{best:.4f}")
        elif self.show:
            print(f"{self.desc}: epoch {epoch}/{self.epochs}  loss {loss:.4f}  val acc {acc:.4f}  best {best:.4f}{extra}",
                  file=sys.stderr, flush=True)


def _progress(show: bool, desc: str, epochs: int, start: int) -> _Progress:
    return _Progress(show, desc, epochs, start)
