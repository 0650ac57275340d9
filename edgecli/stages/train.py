"""train: real data, a real loop with validation, checkpoints, transfer learning, DDP; ONNX out."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from edgecli.artifacts import ArtifactStore, Declared, StageWriter, write_json_atomic
from edgecli.config import PipelineConfig, dump_config
from edgecli.errors import CheckFailed, ConfigError, EdgeError
from edgecli.stages import Built, StageResult, Table, run_stage, skipped_result

STAGE = "train"


def declare(cfg: PipelineConfig) -> Declared:
    """What train reads: its config sections, every data file, the custom model's source, init_from."""
    from edgecli.data import input_files
    from edgecli.models import arch_sources

    d = Declared(STAGE, {"seed": cfg.seed, "data": cfg.section("data"), "model": cfg.section("model"),
                         "train": cfg.section("train")})
    for name, p in input_files(cfg).items():
        d.file(name, p)
    for p in arch_sources(cfg.model.arch):
        d.file(f"model.arch:{p.name}", p)
    if cfg.train.init_from:
        d.file("train.init_from", resolve_init_from(cfg.train.init_from))
    return d


def resolve_init_from(ref: str) -> Path:
    """train.init_from: a weights file, a train stage directory, or a run directory."""
    p = Path(ref).expanduser()
    for cand in (p, p / "weights.safetensors", p / "train" / "weights.safetensors"):
        if cand.is_file():
            return cand
    raise ConfigError(f"train.init_from: no weights at {p} (give a .safetensors file or a train stage directory)")


def build_trained_model(cfg: PipelineConfig, splits, *, resume: bool, quiet: bool, checkpoint: Path | None,
                        fp: str, device=None, dist=None):
    """Build, initialise, freeze and fit the configured model; return (model, fit_result, notes)."""
    from edgecli.models import build_model
    from edgecli.training import apply_freeze, fit, load_matching, load_weights_file, seed_everything

    seed_everything(cfg.seed, cfg.train.deterministic)
    num_classes = cfg.model.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(f"model.num_classes: {num_classes} is fewer than the dataset's {splits.num_classes} classes")
    model = build_model(cfg.model.arch, splits.spec.input_shape, num_classes, cfg.model.args)
    from edgecli.validate import check_forward

    check_forward(model, cfg.model.arch, splits, num_classes)  # model-code mistakes: one line, exit 2
    notes = []
    if cfg.train.init_from:
        wpath = resolve_init_from(cfg.train.init_from)
        loaded, skipped = load_matching(model, load_weights_file(wpath))
        if not loaded:
            raise ConfigError(f"train.init_from: no tensor in {wpath} matches model '{cfg.model.arch}' by name and shape")
        notes.append(f"initialised {len(loaded)} tensors from {wpath}" + (f"; {len(skipped)} not matching (new head?)" if skipped else ""))
    if cfg.train.privacy is not None:
        from edgecli.privacy import check_model

        model, fix_notes = check_model(model, cfg.train.privacy, cfg.model.arch)
        notes.extend(fix_notes)
    frozen = apply_freeze(model, cfg.train.freeze)
    if frozen:
        notes.append(f"froze {frozen} parameter tensors ({', '.join(cfg.train.freeze)})")
    if cfg.train.epochs == 0:  # e.g. a pretrained sentence embedder used as it is published
        from edgecli.training import FitResult

        notes.append("train.epochs is 0: the model is exported as built, without fitting")
        return model.eval(), FitResult(float("nan"), 0, 0, False, None), notes
    private = None
    if cfg.train.privacy is not None:
        from edgecli.privacy import DPSGD

        private = DPSGD(cfg.train.privacy)
    res = fit(
        model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, cfg.train,
        num_classes=num_classes, seed=cfg.seed, checkpoint=checkpoint, resume=resume, fingerprint=fp,
        desc=f"train {cfg.name}", quiet=quiet, device=device, dist=dist, private=private,
    )
    if private is not None:
        res.privacy = private.summary()
        notes.append(f"DP-SGD: ε = {res.privacy['epsilon']:.2f} at δ = {cfg.train.privacy.delta:g} "
                     f"(noise multiplier {res.privacy['noise_multiplier']}, clip {cfg.train.privacy.max_grad_norm})")
        if getattr(cfg.data.preprocess, "normalize", None) == "per_dataset" and splits.spec.kind in ("image", "table"):
            notes.append("data.preprocess.normalize: per_dataset took a mean and std from the training data outside "
                         "the DP-SGD guarantee; set it to none so that every use of the training data is within ε")
    return model, res, notes


def _metrics(model, splits, num_classes):
    from edgecli.training import evaluate

    if getattr(model, "output_name", "logits") != "logits":  # an embedder: its outputs are not class scores
        empty = {"accuracy": None, "f1_macro": None, "num_samples": None}
        return {"val": dict(empty, num_samples=len(splits.val)), "test": dict(empty, num_samples=len(splits.test))}

    val, _ = evaluate(model, splits.val.x, splits.val.y, num_classes)
    test, _ = evaluate(model, splits.test.x, splits.test.y, num_classes)
    return {"val": val, "test": test}


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, resume: bool = False,
        quiet: bool = False, grid=None) -> StageResult:
    """``grid``: a Flower Grid for train.federated under Flower's deployment engine (edgecli.federated.server_app);
    without it the clients are simulated on this machine."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        return _run_distributed(cfg, store, force=force, resume=resume, quiet=quiet)
    from edgecli.data import load_splits

    def build(w: StageWriter) -> Built:
        splits = load_splits(cfg)
        ckpt = store.checkpoint_dir(STAGE) / "last.pt"
        notes = []
        if resume and not ckpt.is_file():
            notes.append(f"--resume: no checkpoint in {ckpt.parent}; starting from epoch 1")
        if splits.skipped:
            notes.append(skipped_note(splits.skipped))
        from edgecli.training import pick_device

        device = pick_device(cfg.train.device)
        if cfg.train.amp != "none" and device.type != "cuda":
            notes.append(f"train.amp={cfg.train.amp} applies on CUDA only; trained in float32 on {device}")
        if cfg.train.federated is not None:
            from edgecli.federated import train_federated

            model, fitres, fit_notes = train_federated(cfg, splits, quiet=quiet, resume=resume, grid=grid)
        else:
            model, fitres, fit_notes = build_trained_model(cfg, splits, resume=resume, quiet=quiet, checkpoint=ckpt,
                                                           fp=w.fingerprint, device=device)
        if fitres.resumed_from_epoch:
            fit_notes.append(f"resumed from the checkpoint of epoch {fitres.resumed_from_epoch}")
        built = _publishable(w, cfg, splits, model, fitres)
        built.notes = notes + fit_notes
        return built

    res = run_stage(store, STAGE, lambda: declare(cfg), build, render, force=force, command="edgecli train")
    if res.status == "done":
        with contextlib.suppress(OSError):
            (store.checkpoint_dir(STAGE) / "last.pt").unlink()
    return res


def _publishable(w: StageWriter, cfg, splits, model, fitres) -> Built:
    """Write the model files and metrics.json; return the manifest's parts."""
    from edgecli.models import model_info

    num_classes = cfg.model.num_classes or splits.num_classes
    info = model_info(cfg, splits, num_classes, model)
    metrics = _metrics(model, splits, num_classes)
    if fitres.privacy is not None:
        metrics["privacy"] = fitres.privacy
    if fitres.federated is not None:
        metrics["federated"] = fitres.federated
    from edgecli.onnxio import save_model_files

    par = save_model_files(w.dir, model, cfg, info, splits.test.x, cfg.train.opset, cfg.train.parity_atol,
                           "train parity (ONNX Runtime vs PyTorch on the test split)")
    write_json_atomic(w.path("metrics.json"), metrics)
    (w.dir / "config.yaml").write_text(dump_config(cfg))
    from edgecli.models.zoo import count_params

    headline = {
        "test_accuracy": metrics["test"]["accuracy"], "val_accuracy": metrics["val"]["accuracy"],
        "test_f1_macro": metrics["test"]["f1_macro"], "params": count_params(model),
        "epochs_run": fitres.epochs_run, "best_epoch": fitres.best_epoch, "stopped_early": fitres.stopped_early,
        "train_seconds": round(fitres.seconds, 2), "parity_max_abs_diff": par["max_abs_diff"],
        "parity_top1_agreement": par["top1_agreement"],
    }
    if fitres.privacy is not None:
        headline.update(epsilon=fitres.privacy["epsilon"], delta=fitres.privacy["delta"])
    if fitres.federated is not None:
        headline.update(federated_clients=fitres.federated["clients"], federated_rounds=fitres.federated["rounds_run"])
    extra = {"model_info": info, "parity": par, "history": fitres.history, "seed": cfg.seed,
             "resumed_from_epoch": fitres.resumed_from_epoch, "data_source": splits.source,
             "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}}
    if splits.skipped:
        extra["skipped_inputs"] = splits.skipped
    if fitres.privacy is not None:
        extra["privacy"] = fitres.privacy
    if fitres.federated is not None:
        extra["federated"] = {k: v for k, v in fitres.federated.items() if k != "rounds"}
    return Built(cfg.section("train"), headline, extra)


def skipped_note(skipped: list[dict], show: int = 5) -> str:
    """One line naming the inputs the loader left out as per-input errors (the manifest lists them all)."""
    listed = "; ".join(s["error"] for s in skipped[:show]) + (f"; and {len(skipped) - show} more" if len(skipped) > show else "")
    return f"data: skipped {len(skipped)} unreadable input(s), trained on the rest (manifest: skipped_inputs): {listed}"


def render(res: StageResult, _view=None) -> StageResult:
    """The headline metrics as one table, for a fresh run and a skipped one alike (from the manifest)."""
    m = res.metrics
    if m:
        rows = [[k, f"{m[k]:g}" if k == "delta" else m.get(k)] for k in ("test_accuracy", "val_accuracy", "test_f1_macro", "params", "epochs_run",
                                          "best_epoch", "parity_max_abs_diff", "parity_top1_agreement", "epsilon",
                                          "delta", "federated_clients", "federated_rounds") if k in m]
        res.tables.append(Table(f"train ({res.status})", ["metric", "value"], rows))
    return res


def _run_distributed(cfg, store: ArtifactStore, *, force: bool, resume: bool, quiet: bool) -> StageResult:
    """torchrun: every rank trains on its shard; rank 0 alone locks, checkpoints and publishes.

    ``train.batch_size`` stays the global batch (each rank takes batch_size / world), so lr needs
    no change against a single process with the same batch size. A rank that dies or stalls makes
    the others fail within ``train.dist_timeout_s`` with a one-line error instead of hanging.
    """
    import time

    import torch.distributed as tdist

    from edgecli.data import load_splits
    from edgecli.training import dist_info, first_line, is_peer_failure

    t0 = time.time()
    d = dist_info()
    device = _join_group(cfg, d)
    lock_cm = store.lock("torchrun edgecli train") if d.is_main else contextlib.nullcontext()
    notes: list[str] = []
    if cfg.train.amp != "none" and device.type != "cuda":
        notes.append(f"train.amp={cfg.train.amp} applies on CUDA only; trained in float32 on {device}")
    held = contextlib.ExitStack()  # the lock, once rank 0 holds it
    try:
        decision, fp, decl, digests = _decide(cfg, store, d, force, lambda: held.enter_context(lock_cm))
        if decision == "skip":
            return render(skipped_result(store, STAGE)) if d.is_main else StageResult(STAGE, "skipped", None)
        splits = load_splits(cfg)
        ckpt = store.checkpoint_dir(STAGE) / "last.pt"
        if d.is_main and resume and not ckpt.is_file():
            notes.append(f"--resume: no checkpoint in {ckpt.parent}; starting from epoch 1")
        model, fitres, fit_notes = build_trained_model(cfg, splits, resume=resume, quiet=quiet, checkpoint=ckpt,
                                                       fp=fp, device=device, dist=d)
        notes += fit_notes
        notes.append(f"trained with DistributedDataParallel on {d.world} processes "
                              f"({cfg.train.batch_size // d.world} samples per process per step)")
        # Every rank waits for rank 0 to publish, then all leave together: a rank that tore down its
        # process group while rank 0 was still exporting aborted in gloo ("terminate called without an
        # active exception"), and torchrun then SIGTERMed rank 0 mid-publish. The wait is bounded by
        # train.dist_timeout_s; if rank 0 fails instead, torchrun stops the waiting ranks at once.
        from edgecli.training import barrier

        if not d.is_main:
            barrier()
            return StageResult(STAGE, "done", None)
        final, metrics = _publish_rank0(cfg, store, fp, decl, digests, splits, model, fitres, d.world)
        with contextlib.suppress(OSError):
            ckpt.unlink()
        barrier()  # released: the other ranks may exit now
        outputs = {p.name: p.stat().st_size for p in sorted(final.iterdir()) if p.is_file()}
        return render(StageResult(STAGE, "done", final, time.time() - t0, metrics=metrics, outputs=outputs,
                                  messages=notes))
    except (tdist.DistError, RuntimeError) as e:
        if not is_peer_failure(e):
            raise
        where = ckpt.parent if "ckpt" in locals() else store.run_dir
        raise EdgeError(
            f"rank {d.rank}: another torchrun process failed or stopped answering ({first_line(e)}); "
            "nothing was published",
            hint=f"torchrun's summary names the rank that failed first; `--resume` continues from the last checkpoint in {where}",
        ) from None
    finally:
        held.__exit__(*sys.exc_info())
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()


def _join_group(cfg, d):
    """This rank's device, with the torchrun process group joined."""
    import torch
    import torch.distributed as tdist

    from edgecli.training import first_line, init_distributed, pick_device

    if cfg.train.batch_size % d.world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is the global batch and must divide evenly "
                          f"among the {d.world} torchrun processes")
    device = pick_device(cfg.train.device, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        init_distributed(device, cfg.train.dist_timeout_s)
    except tdist.DistError as e:
        raise EdgeError(f"rank {d.rank}: cannot join the torchrun group ({first_line(e)})",
                        hint="check --rdzv_endpoint / MASTER_ADDR:MASTER_PORT is reachable from every node") from None
    return device


def _decide(cfg, store: ArtifactStore, d, force: bool, lock):
    """Take the lock (``lock()``; rank 0's is the real one), then rank 0 decides "go" or "skip" (up to
    date) and every rank learns it, with rank 0's fingerprint.

    Returns (decision, fingerprint, declared inputs, digests); an error on rank 0, the lock's included,
    stops every rank.
    """
    from edgecli.training import broadcast_object

    decision, err, decl = "go", None, None
    fp, digests = "", ({}, {})
    try:
        lock()
        if d.is_main:
            decl = declare(cfg)
            digests = decl.digests(store)
            fp = decl.fingerprint(*digests)
            if not force and store.up_to_date(STAGE, fp):
                decision = "skip"
    except EdgeError as e:
        decision, err = f"error: {e.message}", e
    decision = broadcast_object(decision)  # every rank leaves together, or none does
    fp = broadcast_object(fp if d.is_main else "")  # the checkpoint of every rank carries rank 0's
    if decision.startswith("error"):
        if err is not None:
            raise err
        raise CheckFailed(f"rank {d.rank}: rank 0 stopped the run ({decision[7:]})")
    return decision, fp, decl, digests


def _publish_rank0(cfg, store: ArtifactStore, fp: str, decl, digests, splits, model, fitres, world: int):
    """Rank 0 publishes the trained model like a single-process run; returns (stage dir, metrics)."""
    w = store.begin(STAGE)
    w.fingerprint = fp
    w.inputs.update(digests[0])
    try:
        built = _publishable(w, cfg, splits, model, fitres)
        built.extra["world_size"] = world
        final = store.publish(w, config=built.config, fingerprint=fp, metrics=built.metrics, extra=built.extra)
    except BaseException:
        store.discard(w)
        raise
    decl.save_cache()
    return final, built.metrics
