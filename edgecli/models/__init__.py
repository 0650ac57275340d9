"""Model registry: name -> class, imported on use. Every model takes (input_shape, num_classes, **args)
and names its last layer ``classifier`` (pruning keeps it whole by default)."""

from __future__ import annotations

import inspect
from pathlib import Path

from edgecli.errors import ConfigError, ModelFileError
from edgecli.registry import Entry, Registry, did_you_mean

MODELS = Registry(
    "model",
    "model.arch",
    {
        "mlp": Entry("edgecli.models.zoo:MLP", "fully connected net for feature rows or small images"),
        "cnn": Entry("edgecli.models.zoo:CNN", "small 3-layer conv net"),
        "resnet8": Entry("edgecli.models.zoo:ResNet8", "ResNet-8 as in MLPerf Tiny image classification"),
        "mobilenet": Entry("edgecli.models.zoo:MobileNetV2", "MobileNetV2-style net with a width multiplier"),
        "dpcnn": Entry("edgecli.models.zoo:DPCNN", "GroupNorm + tanh CNN for differentially private training"),
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
            for k in args:
                if k not in params or k in ("input_shape", "num_classes"):
                    choices = [p for p in params if p not in ("input_shape", "num_classes", "self")]
                    raise ConfigError(f"{key}.args.{k}: '{arch}' takes no argument '{k}'{did_you_mean(k, choices)}")
    except (TypeError, ValueError):
        pass
    if not isinstance(cls, type):
        raise ConfigError(f"{key}.arch: '{arch}' is a {type(cls).__name__}, not a class (give 'pkg.mod:Class', "
                          "a torch.nn.Module subclass)")
    try:
        model = cls(input_shape=list(input_shape), num_classes=int(num_classes), **args)
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"{key}.arch: '{arch}' is not a torch.nn.Module subclass")
        return model
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{key}: cannot build '{arch}' for input {list(input_shape)}: {e}") from None
    except (MemoryError, RuntimeError) as e:  # torch's allocator: "can't allocate memory: you tried to allocate ..."
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if isinstance(e, RuntimeError) and "allocate" not in first:
            raise
        tail = first.split("DefaultCPUAllocator: ")[-1][:160]
        raise ConfigError(f"{key}.args: '{arch}' is too large to build on this machine ({tail})") from None


def arch_sources(arch: str) -> list[Path]:
    """The source files of a custom ``pkg.mod:Class`` architecture (the module and its packages' __init__).

    Found with ``importlib.util.find_spec``: the module itself is not executed here. A registry name
    returns [] (its code is edgecli's, covered by the version in every fingerprint).
    """
    import importlib.util

    if ":" not in arch:
        return []
    mod = arch.partition(":")[0]
    out: list[Path] = []
    parts = mod.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError) as e:
            raise ConfigError(f"model.arch: cannot import '{name}' ({e})") from None
        if spec is None:
            raise ConfigError(f"model.arch: cannot import '{mod}' (no module named '{name}')")
        if spec.origin and spec.origin not in ("built-in", "frozen") and Path(spec.origin).is_file():
            out.append(Path(spec.origin))
    return out


def trusted_archs(cfg) -> tuple[str, ...]:
    """The architectures this config names (model.arch, every distill student.arch): the only custom code
    edgecli imports. Registry names are always allowed besides."""
    names = [cfg.model.arch]
    for st in cfg.compress.steps:
        opts = st.options
        d = opts if st.kind == "distill" else getattr(opts, "distill", None)
        student = getattr(d, "student", None) if d is not None else None
        if student is not None:
            names.append(student.arch)
    return tuple(names)


def trusted_info(info, trusted, where: str) -> dict:
    """A model description read from an artifact (manifest, model card, ONNX metadata), checked.

    Its ``arch`` is imported only when it is a registry name or one the config itself names
    (``trusted``): a manifest is data, and data never chooses which code runs. Malformed fields are
    an ArtifactError naming ``where``, never a traceback later.
    """
    from edgecli.errors import ArtifactError
    from edgecli.safeio import shown

    if not isinstance(info, dict):
        raise ArtifactError(f"{where}: model_info is not an object")
    arch = info.get("arch")
    if not isinstance(arch, str) or not arch:
        raise ArtifactError(f"{where}: model_info.arch is missing or not a string")
    if arch not in MODELS.entries and arch not in tuple(trusted):
        raise ArtifactError(
            f"{where}: names architecture {shown(arch)!r}, which is neither a registered model nor the config's "
            f"model.arch / distill.student.arch; refused (an artifact never chooses which code edgecli imports)",
            hint="set model.arch in the config to that class if you trust it, or rebuild the artifact")
    shape = info.get("input_shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20
                                                        for d in shape)):
        raise ArtifactError(f"{where}: model_info.input_shape must be a list of positive integers")
    n = info.get("num_classes")
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1 << 20):
        raise ArtifactError(f"{where}: model_info.num_classes must be a positive integer")
    if not isinstance(info.get("args") or {}, dict):
        raise ArtifactError(f"{where}: model_info.args must be an object")
    return info


def model_info(cfg, splits, num_classes: int, model) -> dict:
    """What the train stage records about its model (manifest, ONNX metadata): what ``build_from_info``
    rebuilds it from, and how infer feeds it."""
    io = getattr(model, "onnx_io", None)
    input_names, output_names = (io()["input_names"], io()["output_names"]) if io else (["input"], ["logits"])
    return {
        "arch": cfg.model.arch,
        "args": cfg.model.args,
        "num_classes": num_classes,
        "class_names": splits.class_names,
        "kind": splits.kind,
        "input_shape": splits.spec.input_shape,
        "input_names": input_names,
        "output_names": output_names,
        "preprocess": splits.spec.to_dict(),
        # a CSV's feature columns by name: infer matches a CSV with a header by these, not by position
        **({"feature_names": list(splits.feature_names), "label_column": cfg.data.label_column}
           if getattr(splits, "feature_names", None) else {}),
        **_norm_fix(model),
    }


def _norm_fix(model) -> dict:
    """model_info keys that let compress/bench rebuild a DP model whose BatchNorm became GroupNorm."""
    fix = getattr(model, "_edgecli_norm_fix", None)
    if not fix:
        return {}
    return {"norm_fix": "batchnorm->groupnorm", **({"norm_groups": int(fix)} if fix is not True else {})}


def build_from_info(info: dict, key: str = "model"):
    """The architecture a stage's ``model_info`` describes, including a norm-layer swap made at training.

    DP training (``train.privacy.fix_batchnorm``) replaces BatchNorm by GroupNorm with Opacus'
    ``ModuleValidator.fix``; the weights then only load into the same swapped architecture.
    """
    model = build_model(info["arch"], info["input_shape"], int(info["num_classes"]), info.get("args") or {}, key=key)
    if info.get("norm_fix") == "batchnorm->groupnorm":
        replace_batchnorm(model, info.get("norm_groups"))
    return model


def _is_depthwise(conv) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def rebuild_pruned(model_info: dict, state_dict: dict):
    """Build ``model_info``'s architecture and shrink its layers to the shapes in ``state_dict``.

    Works for unpruned weights too (nothing to shrink), so loaders can always call it.
    Conv, Linear, BatchNorm, LayerNorm and GroupNorm layers are resized; anything else whose
    shape differs is a ModelFileError.
    """
    import torch
    from torch import nn

    model = build_from_info(model_info)
    for name, m in model.named_modules():
        w = state_dict.get(f"{name}.weight" if name else "weight")
        if w is None:
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            out_c = int(w.shape[0])
            groups = out_c if _is_depthwise(m) else m.groups
            in_c = int(w.shape[1]) * groups
            if (out_c, in_c) != (m.out_channels, m.in_channels):
                m.out_channels, m.in_channels, m.groups = out_c, in_c, groups
                m.weight = nn.Parameter(torch.empty_like(w, dtype=m.weight.dtype))
                if m.bias is not None:
                    m.bias = nn.Parameter(torch.empty(out_c, dtype=m.bias.dtype))
        elif isinstance(m, nn.Linear):
            out_f, in_f = int(w.shape[0]), int(w.shape[1])
            if (out_f, in_f) != (m.out_features, m.in_features):
                m.out_features, m.in_features = out_f, in_f
                m.weight = nn.Parameter(torch.empty(out_f, in_f, dtype=m.weight.dtype))
                if m.bias is not None:
                    m.bias = nn.Parameter(torch.empty(out_f, dtype=m.bias.dtype))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = int(w.shape[0])
            if n != m.num_features:
                m.num_features = n
                m.weight = nn.Parameter(torch.empty(n))
                m.bias = nn.Parameter(torch.empty(n))
                m.register_buffer("running_mean", torch.zeros(n))
                m.register_buffer("running_var", torch.ones(n))
        elif isinstance(m, nn.LayerNorm):
            if tuple(w.shape) != tuple(m.normalized_shape):
                m.normalized_shape = tuple(int(s) for s in w.shape)
                m.weight = nn.Parameter(torch.empty_like(w))
                if m.bias is not None:
                    m.bias = nn.Parameter(torch.empty_like(w))
        elif isinstance(m, nn.GroupNorm):
            n = int(w.shape[0])
            if n != m.num_channels:
                m.num_groups = max(1, m.num_groups * n // m.num_channels)
                m.num_channels = n
                m.weight = nn.Parameter(torch.empty(n))
                m.bias = nn.Parameter(torch.empty(n))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)[:200]]
        raise ModelFileError(f"weights do not fit architecture '{model_info['arch']}' even after resizing pruned "
                             f"layers ({first[0].strip()[:200]})") from None
    return model.eval()


def load_weights_into(model, state: dict, arch: str, where: str) -> None:
    """``model.load_state_dict(state)``, with weights that no longer fit the (changed) model code as one
    ConfigError naming the class and the first mismatch, never a torch traceback."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise ConfigError(f"model.arch: the weights in {where} no longer fit '{arch}' (was its code changed?): "
                          f"{detail[:200]}", hint="rerun `edgecli train -c <config>`") from None


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
