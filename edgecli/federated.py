"""Federated training on Flower: partition the training split, train each client with edgecli's loop.

What runs where:

- ``client_app`` is a real ``flwr.clientapp.ClientApp``. On a ``train`` message it loads the global
  weights from the message's ArrayRecord, trains on its own shard with ``edgecli.training.fit``
  (FedProx adds the proximal term through ``fit``'s ``loss_fn``; ``train.privacy`` makes it DP-SGD
  with the client's own Opacus accountant, kept in the node's ``Context.state`` across rounds) and
  replies with its weights and three numbers (num-examples, train_loss, epsilon). Nothing else
  leaves the client.
- The server is Flower's own message-API strategy (``flwr.serverapp.strategy.FedAvg`` or
  ``FedProx``) driven by ``Strategy.start``: Flower samples the clients (``sample_nodes``) and
  averages their ArrayRecords weighted by num-examples (``strategy_utils.aggregate_arrayrecords``).
  edgecli adds the centralised ``evaluate_fn`` (the server's held-out validation split, every round).
- ``LocalGrid`` is the in-process ``flwr.serverapp.Grid`` the simulation runs on: it hands each
  message to the ClientApp of its node, one after the other, after a round trip through Flower's
  protobuf serialisation (``flwr.common.serde``), so exactly what would cross the wire crosses.
  A ClientApp that raises becomes an error reply, as Flower's simulation engine does
  (``vce_api.worker``); a round with fewer replies than ``min_available_clients`` stops the run.

Why not ``flwr.simulation.run_simulation``: it starts Ray; here (2 vCPU) a no-op ClientApp/ServerApp
pair with 10 supernodes took 13.3 s for 1 round and 17 s for 5 rounds before any training, and Ray
runs the clients in worker processes that would each load the data again. The strategy, ClientApp
and messages are the same objects the deployment engine runs (README: SuperLink / SuperNode).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from edgecli.errors import CheckFailed, ConfigError, DataError

# --------------------------------------------------------------------------- partitioning


def partition(y: np.ndarray, clients: int, kind: str, alpha: float, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Indices of the training split for each client: ``iid`` (a seeded even split) or ``dirichlet``.

    Dirichlet(alpha) label skew (Hsu et al. 2019, as flwr-datasets' DirichletPartitioner): for each
    class, the share of its samples each client gets is drawn from Dir(alpha); smaller alpha, more
    skew. Draws are repeated (up to 100 times, seeded) until every client holds ``min_size`` samples.
    """
    n = len(y)
    if n < clients * min_size:
        raise ConfigError(f"train.federated.clients: {clients} clients need at least {clients * min_size} training "
                          f"samples ({min_size} each); the training split has {n}")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    classes = np.unique(y)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            share = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"train.federated.alpha: {alpha} leaves some of the {clients} clients with fewer than {min_size} "
                      "samples in 100 seeded draws; raise alpha or use fewer clients")


# --------------------------------------------------------------------------- the client


@dataclass
class ClientEnv:
    """What a client process holds: the config, its own shard, and how to build the model."""

    cfg: object
    x: object
    y: np.ndarray
    num_classes: int
    input_shape: list[int]
    norm_fix: bool


_ENVS: dict[tuple, ClientEnv] = {}


def _client_env(context) -> ClientEnv:
    """The client's shard, from the run config (config path, overrides) and its node config (partition-id).

    Under the simulation the server registers the environments before the first round; on a
    SuperNode (deployment engine) the client loads the config itself and takes shard
    ``partition-id`` of the same seeded partition, or, with ``data-path`` in its node config, the
    training split of its own data at that path (``data.path``; the config's dataset type).
    """
    pid = int(context.node_config["partition-id"])
    own = str(context.node_config.get("data-path", ""))
    key = (str(context.run_config.get("edgecli-config", "")), str(context.run_config.get("edgecli-set", "")), pid, own)
    env = _ENVS.get(key[:3]) if not own else None
    env = env or _ENVS.get(key)
    if env is None:
        from edgecli.config import load_config
        from edgecli.data import load_splits

        overrides = shlex.split(str(context.run_config.get("edgecli-set", "")))
        if own:  # a device with its own data: its whole training split is its shard
            overrides.append(f"data.path={own}")
        cfg = load_config(str(context.run_config["edgecli-config"]), overrides)
        splits = load_splits(cfg)
        if own:
            idx = np.arange(len(splits.train.y))
        else:
            fed = cfg.train.federated
            idx = partition(splits.train.y, fed.clients, fed.partition, fed.alpha, cfg.seed)[pid]
        env = _shard_env(cfg, splits, idx)
        _ENVS[key] = env
    return env


def _shard_env(cfg, splits, idx: np.ndarray) -> ClientEnv:
    x = splits.train.x
    sub = {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]
    return ClientEnv(cfg, sub, splits.train.y[idx], cfg.model.num_classes or splits.num_classes,
                     list(splits.spec.input_shape), bool(cfg.train.privacy and cfg.train.privacy.fix_batchnorm))


def build_client_model(cfg, input_shape, num_classes: int):
    """The configured model as every participant builds it (BatchNorm swapped first under privacy)."""
    from edgecli.models import build_model

    model = build_model(cfg.model.arch, input_shape, num_classes, cfg.model.args)
    if cfg.train.privacy is not None:
        from edgecli.privacy import check_model

        model, _ = check_model(model, cfg.train.privacy, cfg.model.arch)
    return model


def round_lr(cfg, server_round: int) -> float:
    """Cosine over rounds when train.scheduler is cosine (a client's own schedule would restart each round)."""
    fed = cfg.train.federated
    if cfg.train.scheduler != "cosine":
        return cfg.train.lr
    return cfg.train.lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / fed.rounds))


def client_train(msg, context):
    """The ClientApp's train handler: global weights in, local training on the shard, weights out."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from edgecli.training import fit

    env = _client_env(context)
    cfg, fed = env.cfg, env.cfg.train.federated
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    pid = int(context.node_config["partition-id"])
    model = build_client_model(cfg, env.input_shape, env.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    mu = float(conf.get("proximal-mu", 0.0))
    loss_fn = None
    if mu > 0:  # FedProx: (mu/2) ||w - w_global||^2 keeps the local model near the global one
        global_params = [p.detach().clone() for p in model.parameters()]
        ce = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

        def loss_fn(logits, xb, yb):
            prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
            return ce(logits, yb) + 0.5 * mu * prox

    private = None
    if cfg.train.privacy is not None:
        from edgecli.privacy import DPSGD

        private = DPSGD(cfg.train.privacy, total_epochs=fed.rounds * fed.local_epochs)
        if "edgecli-dp" in context.state:
            private.load_state_dict(json.loads(str(context.state["edgecli-dp"]["state"])))
    local = cfg.train.model_copy(update={"scheduler": "none", "early_stopping": None, "epochs": fed.local_epochs})
    res = fit(model, env.x, env.y, None, None, local, num_classes=env.num_classes,
              seed=cfg.seed * 100003 + pid * 1009 + rnd, lr=round_lr(cfg, rnd), loss_fn=loss_fn, quiet=True,
              desc=f"client {pid}", private=private)
    metrics = {"num-examples": len(env.y), "train_loss": float(res.history[-1]["train_loss"]) if res.history else 0.0}
    if private is not None:
        context.state["edgecli-dp"] = ConfigRecord({"state": json.dumps(private.state_dict())})
        metrics["epsilon"] = private.epsilon()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Message(content=RecordDict({"arrays": ArrayRecord(torch_state_dict=state),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    return app


# --------------------------------------------------------------------------- the in-process grid


class LocalGrid:
    """An in-process ``flwr.serverapp.Grid``: each node is a ClientApp with its own persistent Context.

    Every message and reply goes through Flower's protobuf serde (what the deployment engine sends
    over gRPC). A ClientApp that raises becomes an error reply (as in Flower's simulation engine).
    """

    def __init__(self, client_app, node_configs: list[dict], run_config: dict):
        from flwr.app import Context, RecordDict
        from flwr.serverapp import Grid

        Grid.register(LocalGrid)  # an implementation of Flower's abstract Grid, without its Run bookkeeping
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(len(node_configs))]  # SuperLink's own node id is 1
        self.partition = {nid: int(nc["partition-id"]) for nid, nc in zip(self.node_ids, node_configs, strict=True)}
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(nc), state=RecordDict(),
                                      run_config=dict(run_config))
                         for nid, nc in zip(self.node_ids, node_configs, strict=True)}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        raise NotImplementedError("LocalGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        out = []
        for msg in messages:
            msg = _wire(msg, src=1)
            nid = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[nid])
            except Exception as e:  # an error reply, as Flower's simulation engine makes (vce_api.worker)
                logging.getLogger("edgecli.federated").debug("client %s traceback:\n%s", self.partition[nid],
                                                             traceback.format_exc())
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            out.append(_wire(reply, src=nid))
        return out


class RoundKeeper:
    """Wraps a Grid (the in-process one, or Flower's deployment Grid): keeps each training round's
    replies, names the clients that failed, and stops the run when fewer than ``min_replies`` answered."""

    def __init__(self, grid, min_replies: int, *, names: dict | None = None, log=None):
        self.grid = grid
        self.min_replies = min_replies
        self.names = names or {}
        self.log = log or (lambda s: None)
        self.replies: dict[int, list] = {}
        self.failures: dict[int, dict] = {}
        self._round = 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MessageType

        messages = list(messages)
        out = list(self.grid.send_and_receive(messages, timeout=timeout))
        if not messages or not messages[0].metadata.message_type.startswith(MessageType.TRAIN):
            return out
        self._round += 1
        ok = [r for r in out if not r.has_error()]
        failed = {self.names.get(r.metadata.src_node_id, r.metadata.src_node_id): _reason(r.error.reason)
                  for r in out if r.has_error()}
        answered = {r.metadata.src_node_id for r in out}
        for m in messages:  # no reply within the timeout (a device that went away)
            if m.metadata.dst_node_id not in answered:
                failed[self.names.get(m.metadata.dst_node_id, m.metadata.dst_node_id)] = "no reply before the timeout"
        for k, v in sorted(failed.items()):
            self.log(f"round {self._round}: client {k} failed: {v}")
        self.replies[self._round], self.failures[self._round] = ok, failed
        if len(ok) < self.min_replies:
            who = "; ".join(f"client {k}: {v}" for k, v in sorted(failed.items()))
            raise FederatedRoundFailed(
                f"federated round {self._round}: {len(ok)} of {len(messages)} sampled clients returned an update, "
                f"fewer than train.federated.min_available_clients={self.min_replies} ({who}); nothing was published",
                hint="fix the failing client, or lower train.federated.min_available_clients to let rounds "
                     "continue without it")
        return out


def _reason(text: str) -> str:
    """Flower's error reason reads "<class 'X'>:<'message'>"; edgecli's in-process one is already 'X: message'."""
    import re

    m = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", text or "", re.S)
    return f"{m.group(1)}: {m.group(2).splitlines()[0][:200]}" if m else (text or "").splitlines()[0][:200]


class FederatedRoundFailed(CheckFailed):
    kind = "federated training failed"


def _wire(msg, src: int):
    """A message as the other side receives it: serialised to Flower's protobuf and back."""
    import uuid

    from flwr.common.serde import message_from_proto, message_to_proto

    md = msg.metadata.__dict__
    if not md.get("_message_id"):
        md["_message_id"] = str(uuid.uuid4())
    md["_src_node_id"] = src
    md["_run_id"] = 1
    return message_from_proto(message_to_proto(msg))


# --------------------------------------------------------------------------- the server


@dataclass
class FederatedResult:
    model: object
    best_val_accuracy: float
    best_round: int
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epsilon: float | None = None


def run_federated(cfg, splits, *, config_path: str, overrides: list[str], quiet: bool = False,
                  client_app=None) -> tuple[FederatedResult, RoundKeeper]:
    """Simulate ``train.federated`` on this machine; return the best-validation global model.

    ``client_app`` replaces the ClientApp (tests use one that fails on purpose).
    """
    require_flower()
    fed = cfg.train.federated
    parts = partition(splits.train.y, fed.clients, fed.partition, fed.alpha, cfg.seed)
    run_config = {"edgecli-config": str(config_path), "edgecli-set": shlex.join(overrides)}
    for pid, idx in enumerate(parts):
        _ENVS[(run_config["edgecli-config"], run_config["edgecli-set"], pid)] = _shard_env(cfg, splits, idx)
    local = LocalGrid(client_app or make_client_app(),
                      [{"partition-id": i, "num-partitions": fed.clients} for i in range(fed.clients)], run_config)
    import torch

    # One thread per client, as Flower's simulation engine gives each ClientApp (client_resources
    # num_cpus=1): on a busy 2-vCPU machine a 32-sample CNN step took 940 ms with 2 threads, 40 ms with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return serve(cfg, splits, local, quiet=quiet, names=local.partition)
    finally:
        torch.set_num_threads(threads)


def train_federated(cfg, splits, *, quiet: bool, resume: bool, grid=None):
    """train.federated: Flower aggregates, each client runs edgecli's loop; the best-validation global model."""
    from edgecli.training import FitResult

    notes = ["--resume does not apply to federated training; all rounds were run"] if resume else []
    if grid is None:
        res, _ = run_federated(cfg, splits, config_path=cfg.source, overrides=list(cfg._overrides), quiet=quiet)
    else:
        res, _ = serve(cfg, splits, grid, quiet=quiet)
    fed = cfg.train.federated
    history = [dict(r, epoch=r["round"]) for r in res.rounds]
    fit = FitResult(res.best_val_accuracy, res.best_round, len(res.rounds), False, None, history, res.seconds)
    fit.federated = {"clients": fed.clients, "rounds_run": len(res.rounds), "best_round": res.best_round,
                     "strategy": fed.strategy, "partition": fed.partition,
                     "alpha": fed.alpha if fed.partition == "dirichlet" else None,
                     "aggregation": f"flwr.serverapp.strategy.{'FedProx' if fed.strategy == 'fedprox' else 'FedAvg'} "
                                    "(weighted by num-examples)", "rounds": res.rounds}
    failed = sorted({c for r in res.rounds for c in r["failed_clients"]})
    if failed:
        notes.append(f"clients {', '.join(map(str, failed))} failed in some rounds; those rounds were aggregated "
                     "without them (train.federated.min_available_clients was still met)")
    if cfg.train.privacy is not None:
        p = cfg.train.privacy
        fit.privacy = {"epsilon": res.epsilon, "delta": p.delta, "target_epsilon": p.target_epsilon,
                       "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
                       "accountant": p.accountant, "poisson_sampling": True,
                       "mechanism": "DP-SGD (Opacus) on every client; ε is the largest over clients "
                                    "(sample-level: each sample lives on one client)"}
        notes.append(f"DP-SGD on every client: ε = {res.epsilon:.2f} at δ = {p.delta:g} (largest over clients)")
    notes.append(f"federated: {fed.clients} clients, {len(res.rounds)} rounds, best global model of round "
                 f"{res.best_round} (val acc {res.best_val_accuracy:.4f})")
    return res.model, fit, notes


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("train.federated needs Flower, which is not installed",
                          hint="pip install -e '.[privacy]' (make install installs it)") from None


def serve(cfg, splits, grid, *, quiet: bool = False, names: dict | None = None) -> tuple[FederatedResult, RoundKeeper]:
    """The server side on any Grid: Flower's strategy runs the rounds, edgecli validates after each."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg, FedProx

    from edgecli.training import evaluate, seed_everything

    fed = cfg.train.federated
    seed_everything(cfg.seed, cfg.train.deterministic)  # Flower samples clients with Python's `random`
    _quiet_flower()
    num_classes = cfg.model.num_classes or splits.num_classes
    server_model = build_client_model(cfg, list(splits.spec.input_shape), num_classes)
    sampled = min(fed.clients, fed.sampled)
    need = fed.min_available_clients or sampled
    if need > sampled:
        raise ConfigError(f"train.federated.min_available_clients: {need} but only {sampled} clients are sampled "
                          f"per round (clients {fed.clients} x fraction_fit {fed.fraction_fit})")
    log = (lambda s: print(f"federated {cfg.name}: {s}", file=sys.stderr, flush=True)) if not quiet else (lambda s: None)
    grid = RoundKeeper(grid, need, names=names, log=log)
    common = dict(fraction_train=fed.fraction_fit, fraction_evaluate=0.0, min_train_nodes=sampled,
                  min_available_nodes=fed.clients)
    strategy = FedProx(proximal_mu=fed.proximal_mu, **common) if fed.strategy == "fedprox" else FedAvg(**common)
    best = {"acc": -1.0, "round": 0, "state": None}
    rounds: list[dict] = []
    t0 = time.time()

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        state = arrays.to_torch_state_dict()
        server_model.load_state_dict(state)
        m, _ = evaluate(server_model, splits.val.x, splits.val.y, num_classes)
        acc = float(m["accuracy"])
        if server_round == 0:
            return MetricRecord({"val_accuracy": acc})
        replies = grid.replies.get(server_round, [])
        eps = [float(r.content["metrics"]["epsilon"]) for r in replies if "epsilon" in r.content["metrics"]]
        losses = [(float(r.content["metrics"]["train_loss"]), float(r.content["metrics"]["num-examples"])) for r in replies]
        rec = {"round": server_round, "val_accuracy": round(acc, 5),
               "train_loss": round(sum(a * b for a, b in losses) / max(sum(b for _, b in losses), 1), 5),
               "clients": len(replies), "failed_clients": sorted(grid.failures.get(server_round, {})),
               "lr": round_lr(cfg, server_round)}
        if eps:
            rec["epsilon"] = round(max(eps), 4)  # each sample lives on one client: the max composes in parallel
        rounds.append(rec)
        if acc > best["acc"]:
            best.update(acc=acc, round=server_round, state={k: v.clone() for k, v in state.items()})
        extra = f"  ε {rec['epsilon']:.2f}" if "epsilon" in rec else ""
        log(f"round {server_round}/{fed.rounds}  clients {len(replies)}/{sampled}  loss {rec['train_loss']:.4f}  "
            f"val acc {acc:.4f}  best {best['acc']:.4f}{extra}")
        return MetricRecord({"val_accuracy": acc})

    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    if isinstance(grid.grid, LocalGrid):  # what Flower's ServerApp runtime sets before a strategy builds messages
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    initial = ArrayRecord(torch_state_dict={k: v.detach().clone() for k, v in server_model.state_dict().items()})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=fed.rounds,
                   train_config=ConfigRecord({"lr": float(cfg.train.lr)}), evaluate_fn=evaluate_fn)
    if best["state"] is None:
        raise DataError("federated training produced no global model")
    server_model.load_state_dict(best["state"])
    server_model.eval()
    eps_all = [r["epsilon"] for r in rounds if "epsilon" in r]
    return FederatedResult(server_model, best["acc"], best["round"], rounds, time.time() - t0,
                           max(eps_all) if eps_all else None), grid


def _quiet_flower() -> None:
    """Flower logs every round at INFO on stderr; edgecli prints its own round lines (``-v`` shows Flower's)."""
    lg = logging.getLogger("flwr")
    if lg.level < logging.WARNING and not logging.getLogger().isEnabledFor(logging.DEBUG):
        lg.setLevel(logging.ERROR)
