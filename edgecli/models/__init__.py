"""Model registry: name -> class, imported on use. Every model takes (input_shape, num_classes, **args)
and names its last layer ``classifier`` (pruning keeps it whole by default)."""

from __future__ import annotations

import inspect

from edgecli.errors import ConfigError
from edgecli.registry import Entry, Registry

MODELS = Registry(
    "model",
    "model.arch",
    {
        "mlp": Entry("edgecli.models.zoo:MLP", "fully connected net for feature rows or small images"),
        "cnn": Entry("edgecli.models.zoo:CNN", "small 3-layer conv net"),
        "resnet8": Entry("edgecli.models.zoo:ResNet8", "ResNet-8 as in MLPerf Tiny image classification"),
        "mobilenet": Entry("edgecli.models.zoo:MobileNetV2", "MobileNetV2-style net with a width multiplier"),
        "dscnn": Entry("edgecli.models.zoo:DSCNN", "depthwise-separable CNN as in MLPerf Tiny keyword spotting"),
        "minilm": Entry("edgecli.models.text:MiniLMClassifier", "pretrained all-MiniLM-L6-v2 + mean pooling + head"),
        "minilm-embed": Entry("edgecli.models.text:MiniLMEmbedder", "pretrained all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 norm)"),
    },
)


def build_model(arch: str, input_shape: list[int], num_classes: int, args: dict | None = None, key: str = "model"):
    """Instantiate a registered (or 'pkg.mod:Class') model; bad kwargs are config errors naming the key."""
    cls = MODELS.load(arch)
    args = dict(args or {})
    try:
        sig = inspect.signature(cls)
        params = sig.parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not has_var_kw:
            from edgecli.config import did_you_mean

            for k in args:
                if k not in params or k in ("input_shape", "num_classes"):
                    choices = [p for p in params if p not in ("input_shape", "num_classes", "self")]
                    raise ConfigError(f"{key}.args.{k}: '{arch}' takes no argument '{k}'{did_you_mean(k, choices)}")
    except (TypeError, ValueError):
        pass
    try:
        return cls(input_shape=list(input_shape), num_classes=int(num_classes), **args)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot build '{arch}' for input {list(input_shape)}: {e}") from None


def build_from_info(info: dict, key: str = "model"):
    """The architecture a stage's ``model_info`` describes, including a norm-layer swap made at training.

    DP training (``train.privacy.fix_batchnorm``) replaces BatchNorm by GroupNorm with Opacus'
    ``ModuleValidator.fix``; the weights then only load into the same swapped architecture.
    """
    model = build_model(info["arch"], info["input_shape"], int(info["num_classes"]), info.get("args") or {}, key=key)
    if info.get("norm_fix") == "batchnorm->groupnorm":
        replace_batchnorm(model, info.get("norm_groups"))
    return model


def replace_batchnorm(model, groups: int | None = None):
    """BatchNorm -> GroupNorm(gcd(32, C), C), in place: the rule of Opacus' ModuleValidator.fix (opacus 1.6
    ``validators/batch_norm.py``), written out so compress/bench can rebuild the model without Opacus."""
    import math

    from torch import nn

    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            g = groups or math.gcd(32, child.num_features)
            setattr(model, name, nn.GroupNorm(g, child.num_features, affine=child.affine))
        else:
            replace_batchnorm(child, groups)
    return model
