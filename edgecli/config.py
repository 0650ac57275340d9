"""The pipeline config: one YAML file, validated by pydantic, overridable with --set.

Errors are reported all at once, one line each, in the user's words:
``configs/x.yaml:14 train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgecli.errors import ConfigError
from edgecli.registry import did_you_mean

# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class PreprocessConfig(_Strict):
    """One preprocessing spec shared by train, calibration and infer."""

    resize: tuple[Annotated[int, Field(ge=1, le=8192)], Annotated[int, Field(ge=1, le=8192)]] | None = Field(
        None, description="[height, width] for image data")
    channels: Literal[1, 3] | None = Field(None, description="convert images to 1 or 3 channels")
    normalize: Literal["per_dataset", "none", "imagenet"] = "per_dataset"


class DataConfig(_Strict):
    dataset: str = "digits"
    path: str | None = Field(None, description="file or directory for imagefolder/csv/npz/textcsv")
    val_split: float = Field(0.2, ge=0.0, lt=0.9)
    test_split: float = Field(0.2, ge=0.0, lt=0.9)
    label_column: str = "label"
    text_column: str = "text"
    class_names: list[str] | dict[int, str] | None = Field(
        None, description="class order (a list), or names of numeric labels ({0: malignant, 1: benign})")
    max_samples: int | None = Field(None, gt=0)
    # synthetic data: shape of one sample (C,H,W or F), classes and count
    shape: list[int] | None = None
    num_classes: int | None = Field(None, ge=2)
    num_samples: int = Field(1000, gt=0)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)

    @model_validator(mode="after")
    def _splits(self):
        if self.val_split + self.test_split >= 0.9:
            raise ValueError("val_split + test_split must leave at least 10% for training")
        return self


class ModelConfig(_Strict):
    arch: str = "cnn"
    num_classes: int | None = Field(None, ge=2, description="default: the dataset's class count")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model class")


class EarlyStoppingConfig(_Strict):
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class PrivacyConfig(_Strict):
    """DP-SGD through Opacus: per-sample clipping + Gaussian noise, Poisson sampling, privacy accountant."""

    target_epsilon: float | None = Field(None, gt=0, description="the noise is chosen so training spends at most this ε")
    noise_multiplier: float | None = Field(None, gt=0, description="instead of target_epsilon: a fixed noise multiplier")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee; well below 1/training-set size")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping bound")
    fix_batchnorm: bool = Field(False, description="replace BatchNorm by GroupNorm (Opacus ModuleValidator.fix); "
                                "BatchNorm mixes samples of a batch, which DP-SGD cannot bound")
    norm_groups: int | None = Field(None, ge=1, description="fix_batchnorm: GroupNorm groups (default Opacus': "
                                    "gcd(32, channels), one channel per group below 32 channels)")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus accountant: prv (tighter) or rdp")
    secure_mode: bool = Field(False, description="noise from a cryptographically secure RNG (Opacus secure_mode); "
                              "runs are then not repeatable from the seed")

    @model_validator(mode="after")
    def _one_noise(self):
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        return self


class FederatedConfig(_Strict):
    """Federated training on Flower: clients train on their own shard, only parameters travel."""

    clients: int = Field(10, ge=1, le=1000, description="simulated clients the training split is partitioned across")
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(1, ge=1, description="epochs each client trains on its shard per round")
    fraction_fit: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled each round")
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration; smaller is more label skew")
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0, description="fedprox: weight of the proximal term (mu/2)||w - w_global||^2")
    min_available_clients: int | None = Field(
        None, ge=1, description="a round needs this many client updates; fewer (crashed clients) stops the run. "
        "Default: the number sampled each round")

    @model_validator(mode="after")
    def _rules(self):
        if self.min_available_clients is not None and self.min_available_clients > self.clients:
            raise ValueError(f"min_available_clients ({self.min_available_clients}) is more than clients ({self.clients})")
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            raise ValueError("strategy fedprox needs proximal_mu > 0 (0 is plain fedavg)")
        if self.strategy == "fedavg" and self.proximal_mu:
            raise ValueError("proximal_mu applies to strategy fedprox only")
        return self

    @property
    def sampled(self) -> int:
        """Clients sampled per round (Flower's FedAvg: int(clients * fraction_fit), at least min_train_nodes)."""
        return max(1, int(self.clients * self.fraction_fit), self.min_available_clients or 1)


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=0, description="0: export the (pretrained) model as built, without fitting")
    batch_size: int = Field(64, ge=1, description="global batch size (split across ranks under torchrun)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "none"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    early_stopping: EarlyStoppingConfig | None = None
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    deterministic: bool = False
    init_from: str | None = Field(None, description="safetensors file or a run directory's train stage")
    freeze: list[str] = Field(default_factory=list, description="parameter name prefixes to freeze")
    max_grad_norm: float | None = Field(None, gt=0)
    opset: int = Field(17, ge=17, le=23)
    parity_atol: float = Field(1e-4, gt=0)
    dist_timeout_s: int = Field(300, ge=10, description="torchrun: seconds before a stuck rank ends the run")
    privacy: PrivacyConfig | None = Field(None, description="differentially private training (Opacus DP-SGD)")
    federated: FederatedConfig | None = Field(None, description="federated training on Flower (simulated clients)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _privacy_rules(self):
        if self.privacy is not None:
            if self.amp != "none":
                raise ValueError("privacy: DP-SGD runs in float32; set train.amp: none")
            if self.max_grad_norm is not None:
                raise ValueError("privacy: clipping is per sample under DP-SGD (train.privacy.max_grad_norm); "
                                 "remove train.max_grad_norm")
            if self.class_weights != "none":
                raise ValueError("privacy: class_weights are computed from the training labels, which DP-SGD "
                                 "does not cover; remove train.class_weights")
        return self


class CalibrationConfig(_Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(256, ge=1)
    data: str | None = Field(None, description=".npy/.npz file of model inputs")


class QuantizeConfig(_Strict):
    mode: Literal["static", "dynamic", "fp16", "int4_weight_only", "int8_weight_only", "auto"] = "static"
    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    reduce_range: bool = False
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    block_size: int = Field(32, ge=16, description="int4/int8 weight-only: weights per quantization block (power of two)")
    symmetric: bool = True
    accuracy_level: int | None = Field(
        None, ge=0, le=4, description="weight-only: MatMulNBits compute type (default: FP32 for int4, 4 = int8 for int8)")
    nodes_to_exclude: list[str] = Field(default_factory=list)
    op_types: list[str] | None = None
    force: bool = Field(False, description="keep this mode even if it is slower than its input")

    # Cross-field rules, checked on the field they are about so that validate and --dry-run name its
    # line; ``mode`` is declared (so validated) first. The modes themselves: compression/quantize_modes.MODES.
    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("mode") in ("int4_weight_only", "int8_weight_only", "auto") and v & (v - 1):
            raise ValueError("must be a power of two >= 16")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str, info: ValidationInfo) -> str:
        mode = info.data.get("mode")
        if v == "qoperator" and mode is not None and mode not in ("static", "auto"):
            raise ValueError(f"qoperator applies to static quantization only (mode is {mode})")
        return v


class StudentConfig(_Strict):
    arch: str
    args: dict[str, Any] = Field(default_factory=dict)


class DistillConfig(_Strict):
    teacher: str = Field("train", description="'train' or a path to a safetensors/train stage")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft-target loss")
    temperature: float = Field(4.0, gt=0)
    student: StudentConfig | None = None
    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0)


class PruneConfig(_Strict):
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l1"
    ratio: float = Field(0.5, gt=0, lt=1)
    target: Literal["ratio", "params", "macs"] = "ratio"
    global_pruning: bool = False
    iterative_steps: int = Field(1, ge=1)
    ignore: list[str] | None = Field(None, description="module names kept whole (default: the classifier)")
    round_to: int | None = Field(
        8, ge=1, description="keep channel counts multiples of this (kernels like multiples of 8; 1 or null: any count)")
    finetune_epochs: int = Field(10, ge=0)
    lr: float | None = Field(None, gt=0)
    distill: DistillConfig | None = None
    max_tries: int = Field(3, ge=1)


class SparsityConfig(_Strict):
    ratio: float = Field(0.5, gt=0, lt=1)
    finetune_epochs: int = Field(0, ge=0)


class StepConfig(_Strict):
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    quantize: QuantizeConfig | None = None
    sparsity: SparsityConfig | None = None

    @model_validator(mode="after")
    def _one(self):
        set_ = [k for k in ("prune", "distill", "quantize", "sparsity") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("each step must have exactly one of prune, distill, quantize, sparsity")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("prune", "distill", "quantize", "sparsity") if getattr(self, k) is not None)

    @property
    def options(self) -> BaseModel:
        return getattr(self, self.kind)


class CompressConfig(_Strict):
    input: str = Field("train", description="a stage name or a path to an ONNX model")
    steps: list[StepConfig] = Field(default_factory=list)
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="guard for class scores: accuracy (or top-1 agreement) may drop this much")
    min_cosine: float = Field(
        0.99, ge=-1, le=1, description="guard for embeddings/regressors: every sample keeps this cosine to FP32")
    objective: Literal["latency", "size"] = "latency"
    threads: int = Field(1, ge=1, le=1024)
    confirm_repeats: int = Field(
        3, ge=0, le=10, description="objective latency: fresh processes (bench's protocol) that confirm the choice; 0 skips")
    eval_samples: int | None = Field(None, ge=1, description="validation samples used to score candidates")
    transformer_optimize: bool = Field(
        False, description="fuse attention/LayerNorm/GELU (ONNX Runtime's BERT optimizer) before quantizing")
    num_heads: int | None = Field(None, ge=1, description="transformer_optimize: attention heads (default: the model's config.json)")
    hidden_size: int | None = Field(None, ge=1, description="transformer_optimize: hidden size (default: the model's config.json)")

    @model_validator(mode="after")
    def _step_order(self):
        """Cross-field rules of the steps, here so that validate and --dry-run report them with file:line."""
        problems, first_q = [], None
        for i, st in enumerate(self.steps):
            if st.kind == "quantize":
                first_q = i if first_q is None else first_q
            elif first_q is not None:
                problems.append(f"compress.steps.{i}: {st.kind} is a PyTorch-level step and must come before every quantize "
                                f"step (compress.steps.{first_q} quantizes the ONNX model; nothing trainable is left after it)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _runtime_name(name: str) -> str:
    from edgecli.runtimes import BACKENDS

    if name not in BACKENDS:
        raise ValueError(f"unknown runtime '{name}'{did_you_mean(name, BACKENDS)}; choose from {', '.join(sorted(BACKENDS))}")
    return name


class ParityConfig(_Strict):
    atol: float = Field(1e-4, gt=0, description="float input: max abs diff allowed between input and export")
    samples: int = Field(256, ge=1)
    min_agreement_quantized: float = Field(
        0.99, ge=0, le=1, description="quantized input: top-1 agreement required (offline fusion changes rounding)")


class ExportConfig(_Strict):
    input: str | None = Field(None, description="stage name or .onnx path; default compress, else train")
    opset: int | None = Field(None, ge=13, le=23)
    optimize: bool = True
    optimization_level: Literal["basic", "extended"] = "extended"
    ort_format: bool = True
    parity: ParityConfig = Field(default_factory=ParityConfig)
    targets: list[str] | Literal["auto"] = Field(
        default_factory=lambda: ["onnx", "ort"],
        description="files to publish: onnx, ort, tflite, pte, openvino (each optionally :precision, e.g. "
                    "tflite:int8), or auto: the fastest runtime x precision that holds the accuracy gate")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        from edgecli.runtimes.targets import parse

        if v == "auto" or v == ["auto"]:
            return "auto"
        for item in v:
            try:
                parse(item)
            except ConfigError as e:
                raise ValueError(e.message.removeprefix("export.targets: ")) from None
        if "onnx" not in [str(t).partition(":")[0] for t in v]:
            raise ValueError("must include onnx (the model every other target is checked against)")
        return v

    @property
    def writes_ort(self) -> bool:
        """model.ort is written when ort_format is on and the targets ask for it (auto keeps it)."""
        return self.ort_format and (self.targets == "auto" or "ort" in self.targets)


class BudgetConfig(_Strict):
    model: str | None = Field(None, description="which benched model the budgets apply to (default: last)")
    batch_size: int | None = Field(None, ge=1, description="batch size the latency budgets apply to (default: smallest benched)")
    latency_p50_ms: float | None = Field(None, gt=0)
    latency_p95_ms: float | None = Field(None, gt=0)
    size_kb: float | None = Field(None, gt=0)
    accuracy_min: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    peak_memory_mb: float | None = Field(None, gt=0)
    max_regression: float | None = Field(None, gt=0, description="e.g. 0.1: fail if p95 is 10% worse than --baseline")


class BenchConfig(_Strict):
    models: list[str] = Field(default_factory=list, description="stage names or .onnx paths; default: all present")
    torch_baseline: bool = True
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1])
    threads: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=lambda: [1])
    warmup: int = Field(50, ge=0)
    runs: int = Field(500, ge=1)
    min_time_s: float | None = Field(None, gt=0, description="keep timing until this many seconds have passed too")
    repeats: int = Field(3, ge=1, le=20, description="fresh worker processes per measurement, run in interleaved "
                         "order, their timed runs pooled: one process's p50 can sit 30-50% off another's here")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    accuracy_samples: int | None = Field(None, ge=1)
    budgets: BudgetConfig = Field(default_factory=BudgetConfig)
    serve: ServeBenchConfig | None = Field(None, description="the server scenario; unset: not run")
    runtimes: list[str] | None = Field(None, description="runtimes whose export targets get a row (litert, "
                                       "executorch, openvino, onnxruntime); default: every target in the export bundle")
    profile: bool = Field(False, description="after timing, one short run per model with its runtime's own "
                          "profiler: a profile-<model> file each and the top operators by share of time")

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v):
        for name in v or []:
            _runtime_name(name)
        return v


class InferConfig(_Strict):
    input: str = Field("export", description="stage name or .onnx path")
    runtime: str | None = Field(None, description="onnxruntime, litert, executorch or openvino; default: by the "
                                "file's suffix (for the export stage: the card's chosen target, else model.onnx)")

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v):
        return v if v is None else _runtime_name(v)
    top_k: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1, le=1 << 20)
    threads: int = Field(1, ge=1, le=1024)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class ServeBenchConfig(_Strict):
    """bench's server scenario: Poisson arrivals at each offered rate against `edgecli serve` on loopback."""

    qps: list[Annotated[float, Field(gt=0, le=1_000_000)]] = Field(min_length=1, description="offered loads, req/s")
    seconds: float = Field(5.0, gt=0, le=3600, description="how long each offered load runs")
    max_in_flight: int = Field(256, ge=1, le=65536, description="the load generator's bound on open requests")


class ServeConfig(_Strict):
    input: str = Field("export", description="stage name or model file (.onnx, .ort, or any runtime's file)")
    runtime: str | None = Field(None, description="a runtime-layer backend; default: the one for the file's suffix")
    threads: int = Field(1, ge=1, le=1024, description="the runtime's intra-op threads")
    top_k: int = Field(3, ge=1)
    max_batch: int = Field(32, ge=1, le=65536, description="rows run as one batch at most")
    max_wait_ms: float = Field(1.0, ge=0, le=10_000, description="how long a batch waits for company")
    queue_limit: int = Field(1024, ge=1, le=1_000_000, description="requests waiting; more get 503")
    max_request_bytes: int = Field(4 << 20, ge=1024, le=1 << 30, description="a larger body gets 413")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="env variable holding the API key; unset: no key")
    allow_path: bool = Field(False, description='answer {"path": ...} requests (reads files on the server)')
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class PipelineConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    artifacts_dir: str = "artifacts"
    seed: int = Field(0, ge=0, lt=2**32, description="numpy takes seeds in [0, 2^32)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    # where the config came from (not part of the schema)
    _source: str = "<config>"
    _base_dir: Path = Path(".")
    _overrides: tuple = ()  # the --set items, so a federated client on another machine can load the same config

    @property
    def source(self) -> str:
        return self._source

    def resolve_path(self, p: str | Path) -> Path:
        """A path from the config: absolute as given, relative to the current directory."""
        return Path(p).expanduser()

    def section(self, name: str) -> dict:
        return getattr(self, name).model_dump(mode="json")


# --------------------------------------------------------------------------- YAML with lines


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and remembers the line of every key path."""


_MAX_NODES = 100_000  # a real pipeline config has a few hundred values
# Aliases repeat a node without repeating its text: bound what the document expands to, counted in
# characters of scalars (a 100 KB string aliased 10,000 times is 1 GB once validated or dumped).
_MAX_EXPANDED_CHARS = 16 << 20
_MAX_KEY_DEPTH = 32  # --set a.b.c...: the schema is 5 levels deep


def _compose_lines(text: str, source: str) -> dict[str, int]:
    """Map dotted key paths to 1-based line numbers; raise ConfigError on duplicate keys."""
    lines: dict[str, int] = {}
    dups: list[str] = []
    root = yaml.compose(text, Loader=_LineLoader)
    # Aliases share nodes: a self-referencing alias would recurse forever and nested aliases
    # ("billion laughs") expand exponentially in validation and dumps; bound both.
    on_path: set[int] = set()
    budget = [_MAX_NODES, _MAX_EXPANDED_CHARS]

    def walk(node: yaml.Node, prefix: str) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"{source}: more than {_MAX_NODES} values after expanding YAML aliases; refused")
        if isinstance(node, yaml.ScalarNode):
            budget[1] -= len(node.value) + 1
            if budget[1] < 0:
                raise ConfigError(f"{source}: expands to more than {_MAX_EXPANDED_CHARS >> 20} MB of values "
                                  "through YAML aliases; refused")
        if id(node) in on_path:
            line = node.start_mark.line + 1
            raise ConfigError(f"{source}:{line} {prefix or '<top>'}: YAML alias refers to itself; refused")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            on_path.add(id(node))
            try:
                _walk_children(node, prefix)
            finally:
                on_path.discard(id(node))

    def _walk_children(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for knode, vnode in node.value:
                key = str(knode.value)
                path = f"{prefix}.{key}" if prefix else key
                line = knode.start_mark.line + 1
                if key in seen:
                    dups.append(f"{source}:{line} {path}: duplicate key (first set on line {seen[key]})")
                seen[key] = line
                lines[path] = line
                walk(vnode, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}.{i}"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    if root is not None:
        walk(root, "")
    if dups:
        raise ConfigError(dups)
    return lines


def _load_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    from edgecli.safeio import CONFIG_LIMIT, read_user_bytes, shown

    source = shown(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{source}: config file not found")
    # the guarded reader: a FIFO or /dev/zero as -c is refused at once, a huge file by its size
    data_bytes = read_user_bytes(path, "a YAML config", CONFIG_LIMIT, ConfigError)
    try:
        text = data_bytes.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file (UTF-8 YAML expected)") from None
    if "\0" in text:
        raise ConfigError(f"{source}: not a text file (holds NUL bytes; UTF-8 YAML expected)")
    try:
        lines = _compose_lines(text, source)
        data = yaml.load(text, Loader=_LineLoader)  # SafeLoader: no python tags
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or e.context or "invalid YAML"
        if "python/" in str(problem) or "could not determine a constructor" in str(problem):
            problem = f"{problem} (edgecli only loads plain YAML; tags that build Python objects are refused)"
        raise ConfigError(f"{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML ({e})") from None
    except RecursionError:  # PyYAML parses recursively: a hostile file nests thousands deep
        raise ConfigError(f"{source}: values nested too deeply; refused") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as e:  # PyYAML's own constructors (dates, ints)
        raise ConfigError(f"{source}: invalid YAML value ({type(e).__name__}: {str(e)[:120]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections (name, data, model, train, ...)")
    return data, lines


# --------------------------------------------------------------------------- --set overrides


def _apply_override(raw: dict, item: str) -> str:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value (e.g. --set train.epochs=3)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key path")
    if key.count(".") >= _MAX_KEY_DEPTH:
        raise ConfigError(f"--set {key[:60]}...: key path deeper than {_MAX_KEY_DEPTH} levels; no config key is")
    try:
        if text.strip():
            _compose_lines(text, f"--set {key}")  # the same alias and nesting bounds as the file
        value = yaml.safe_load(text) if text.strip() else None
    except ConfigError:
        raise
    except yaml.YAMLError:
        value = text  # not YAML: the raw string, validated by the schema like any other value
    except RecursionError:
        raise ConfigError(f"--set {key}: value nested too deeply; refused") from None
    except (ValueError, TypeError, OverflowError) as e:  # PyYAML constructors (a date like 2026-13-45)
        raise ConfigError(f"--set {key}: cannot parse the value ({type(e).__name__}: {str(e)[:100]})") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not an index of the list")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a section")
        if node.get(part) is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of the list")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
    return key


# --------------------------------------------------------------------------- error rendering


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'did you mean')."""
    model: Any = PipelineConfig
    for part in loc:
        cls = _as_model(model)
        if cls is None:
            if isinstance(part, int):
                continue
            return None
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return cls
        model = _unwrap(field.annotation)
    return _as_model(model)


def _unwrap(ann: Any) -> Any:
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(ann):
            if arg is not type(None):
                inner = _unwrap(arg)
                if _as_model(inner) is not None:
                    return inner
        return ann
    if origin in (list, tuple):
        args = typing.get_args(ann)
        return _unwrap(args[0]) if args else ann
    return ann


def _as_model(x: Any) -> type[BaseModel] | None:
    return x if isinstance(x, type) and issubclass(x, BaseModel) else None


def _line_for(path: str, lines: dict[str, int]) -> int | None:
    parts = path.split(".")
    while parts:
        p = ".".join(parts)
        if p in lines:
            return lines[p]
        parts.pop()
    return None


def _render(e: ValidationError, source: str, lines: dict[str, int], overridden: set[str]) -> list[str]:
    out = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        path = ".".join(str(p) for p in loc)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            msg = "unknown key" + (did_you_mean(str(loc[-1]), parent.model_fields) if parent else "")
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("model_type",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        # an override's own key, a key below it, or the unknown section it tried to create
        origin = "--set" if any(path == o or path.startswith(o + ".")
                                or (o.startswith(path + ".") and path not in lines) for o in overridden) else None
        if origin:
            where = f"{source} --set"
        else:
            line = _line_for(path, lines)
            where = f"{source}:{line}" if line else source
        out.append(f"{where} {path or '<top>'}: {msg}")
    # in file order (pydantic reports in schema order); then the same location can be reported
    # once per union member: keep the first
    def _line_no(text: str) -> int:
        head = text.split(" ", 1)[0]
        tail = head.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else 10**9

    out.sort(key=_line_no)
    seen, unique = set(), []
    for line in out:
        key = line.split(": ", 1)[0]
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return unique


# --------------------------------------------------------------------------- public API


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Load, override and validate a pipeline config. Raises ConfigError with every problem."""
    path = Path(path)
    try:
        raw, lines = _load_yaml(path)
        overridden = {_apply_override(raw, item) for item in overrides}
        try:
            cfg = PipelineConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_render(e, str(path), lines, overridden)) from None
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply; refused") from None
    except Exception as e:  # noqa: BLE001 - the funnel is total: anything else about this input is still one line
        raise ConfigError(f"{path}: cannot be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from None
    cfg._source = str(path)
    cfg._base_dir = path.parent
    cfg._overrides = tuple(overrides)
    return cfg


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
