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
