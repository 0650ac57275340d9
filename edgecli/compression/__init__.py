"""Compression methods that the compress stage composes, in order.

Torch-level steps (prune, distill, sparsity) transform ``TorchContext.model`` in place and run
before ONNX-level steps (quantize). The compress stage measures every step before and after
(params, MACs, ONNX bytes, validation accuracy, p50 latency); step functions only transform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TorchContext:
    model: Any  # torch.nn.Module being compressed (trained weights loaded)
    splits: Any  # edgecli.data.Splits (preprocessed train/val/test)
    cfg: Any  # PipelineConfig
    model_info: dict  # from the train manifest: arch, args, input_shape, class_names, preprocess...
    num_classes: int
    baseline_val_accuracy: float  # the input model's validation accuracy
    teacher: Any = None  # torch.nn.Module (the trained model), loaded lazily by distillation
    quiet: bool = False
    notes: list[str] = field(default_factory=list)  # human-readable lines for the CLI
    # the train stage's weights the compress stage read: distill.teacher 'train' rebuilds them when no
    # earlier step set ``teacher`` (never looked up again in the store)
    teacher_weights: Path | None = None


def rounded(x, n: int = 5):
    """``x`` rounded to ``n`` places for reports; None stays None."""
    return None if x is None else round(float(x), n)
