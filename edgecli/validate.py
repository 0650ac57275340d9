"""Static checks of a loaded config: every registered name resolves (no heavy imports)."""

from __future__ import annotations

from edgecli.config import PipelineConfig
from edgecli.errors import ConfigError


def check_names(cfg: PipelineConfig) -> None:
    from edgecli.data import DATASETS
    from edgecli.models import MODELS

    problems = []
    for reg, name in ((DATASETS, cfg.data.dataset), (MODELS, cfg.model.arch)):
        try:
            reg.check(name)
        except ConfigError as e:
            problems += e.problems
    for i, step in enumerate(cfg.compress.steps):
        for sub in ("distill",):
            opts = getattr(step.options, sub, None) if step.kind == "prune" else (step.options if step.kind == sub else None)
            if opts is not None and getattr(opts, "student", None) is not None:
                try:
                    MODELS.check(opts.student.arch)
                except ConfigError as e:
                    problems += [p.replace("model.arch", f"compress.steps.{i}.{step.kind}.student.arch") for p in e.problems]
    if problems:
        raise ConfigError(problems)
    # a custom class is imported, as train would: a path that does not import is a config error now
    for key, name in (("model.arch", cfg.model.arch),):
        if ":" in name:
            from edgecli.registry import import_target

            import_target(name, key)


def describe(cfg: PipelineConfig) -> list[str]:
    """What the config's names resolve to, one line each (printed by `edgecli validate`)."""
    from edgecli.data import DATASETS
    from edgecli.models import MODELS

    out = []
    for key, reg, name in (("data.dataset", DATASETS, cfg.data.dataset), ("model.arch", MODELS, cfg.model.arch)):
        if name in reg.entries:
            out.append(f"{key}: {name} -> {reg.entries[name].target}")
        else:
            out.append(f"{key}: {name} (custom code, imported from your Python path: run only configs you trust)")
    for i, step in enumerate(cfg.compress.steps):
        out.append(f"compress.steps.{i}: {step.kind}")
    return out


def check_artifacts(cfg: PipelineConfig) -> list[str]:
    """What the run's published stages would make edgecli import, checked as the stages will check it.

    A train manifest naming an architecture the config does not name is the same artifact error here
    as in compress or bench, before anything is run. Returns one line per published stage checked.
    """
    from edgecli.artifacts import ArtifactStore
    from edgecli.models import trusted_archs, trusted_info

    store = ArtifactStore.for_config(cfg)
    out = []
    if store.exists("train"):
        info = store.manifest("train").get("model_info")
        if info:
            info = trusted_info(info, trusted_archs(cfg), str(store.stage_dir("train") / "manifest.json"))
            out.append(f"artifacts: {store.stage_dir('train')} builds {info['arch']}")
    return out


def check_model(cfg: PipelineConfig) -> list[str]:
    """What train would refuse, found now: the data (path, files, empty class folders, split sizes),
    ``init_from``, then the model built for the data's input shape and run forward on one sample.

    A model-code mistake (import error, not a Module, a function, a wrong signature, a forward that
    fails on the shape, a tuple/dict output, an output size other than the class count) is a
    ConfigError naming the class and the shape. Returns lines for ``validate``'s report.
    """
    from edgecli.data import input_files, load_splits

    input_files(cfg)  # a missing path, an empty class folder: before anything is loaded
    check_calibration_files(cfg)
    splits = load_splits(cfg)
    out = [f"data: {splits.source}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
           f"{splits.num_classes} classes, input {splits.spec.input_shape}"]
    return out + _forward(cfg, splits)


def check_calibration_files(cfg: PipelineConfig) -> None:
    """Each quantize step's ``calibration.data``: a regular file that is there (compress would refuse it later)."""
    from edgecli.runtimes.feeds import input_path

    for i, st in enumerate(cfg.compress.steps):
        c = st.quantize.calibration.data if st.kind == "quantize" else None
        if c:
            input_path(c, f"compress.steps.{i}.quantize.calibration.data")


def _forward(cfg: PipelineConfig, splits) -> list[str]:
    import torch

    from edgecli.models import MODELS, build_model

    arch = cfg.model.arch
    shape = list(splits.spec.input_shape)
    num_classes = cfg.model.num_classes or splits.num_classes
    try:
        cls = MODELS.load(arch)
    except ConfigError:
        raise
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        what = "a function" if callable(cls) and not isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ConfigError(f"model.arch: '{arch}' is {what}, not a torch.nn.Module class")
    model = build_model(arch, shape, num_classes, cfg.model.args)
    lines = []
    if cfg.train.privacy:  # what DP-SGD refuses (BatchNorm without fix_batchnorm, ...); the forward runs the fixed model
        from edgecli.privacy import check_model as dp_model

        model, fix_notes = dp_model(model, cfg.train.privacy, arch)
        lines += [f"model: {n}" for n in fix_notes]
    if cfg.train.init_from:
        from edgecli.training import load_matching, load_weights_file

        w = _init_from(cfg.train.init_from)
        loaded, _ = load_matching(model, load_weights_file(w))
        if not loaded:
            raise ConfigError(f"train.init_from: no tensor in {w} matches model '{arch}' by name and shape")
    return lines + check_forward(model, arch, splits, num_classes)


def check_forward(model, arch: str, splits, num_classes: int) -> list[str]:
    """One forward on one validation sample: a ConfigError naming the class and shape if it fails,
    returns something other than a tensor, or gives an output size other than the class count."""
    import torch

    shape = list(splits.spec.input_shape)
    x = splits.val.x
    sample = {k: torch.as_tensor(v[:1]) for k, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x[:1])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(**sample) if isinstance(sample, dict) else model(sample)
    except Exception as e:  # noqa: BLE001 - the user's forward: any failure is reported as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"model.arch: '{arch}' fails forward on one sample of shape {[1, *shape]} "
                          f"({type(e).__name__}: {first})") from None
    if not isinstance(y, torch.Tensor):
        raise ConfigError(f"model.arch: '{arch}' returns a {type(y).__name__} for input {[1, *shape]}; "
                          "edgecli needs one tensor of class scores [N, classes]")
    model.train(was_training)
    embedder = getattr(model, "output_name", "logits") != "logits"
    if not embedder and (y.ndim != 2 or y.shape[1] != num_classes):
        raise ConfigError(f"model.arch: '{arch}' outputs shape {list(y.shape)} for input {[1, *shape]}, but the data "
                          f"has {num_classes} classes (expected [1, {num_classes}])")
    return [f"model: {arch} builds for input {[1, *shape]} and outputs {list(y.shape)}"]


def _init_from(ref: str):
    from pathlib import Path

    p = Path(ref).expanduser()
    for cand in (p, p / "weights.safetensors", p / "train" / "weights.safetensors"):
        if cand.is_file():
            return cand
    raise ConfigError(f"train.init_from: no weights at {p} (give a .safetensors file or a train stage directory)")
