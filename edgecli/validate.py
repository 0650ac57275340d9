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
