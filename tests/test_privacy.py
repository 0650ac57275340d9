"""Differentially private (Opacus) and federated (Flower) training through `edgecli train`.

Tiny runs (digits, an 8-16-16 CNN, a few epochs or rounds), built once per module. The accuracy
figures of the issue (DP at ε <= 8, 10 Dirichlet clients x 20 rounds) come from benchmarks/privacy.py.
"""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest

from edgecli.artifacts import ArtifactStore
from edgecli.config import load_config
from edgecli.errors import ConfigError
from tests.conftest import cli, tiny_config, write_config

# find_spec, not importorskip: importing Opacus and Flower at collection cost every xdist worker ~5 s
pytestmark = pytest.mark.skipif(not all(find_spec(m) for m in ("opacus", "flwr")),
                                reason="needs the privacy extra (pip install -e '.[privacy]')")

MODEL = {"arch": "cnn", "args": {"channels": [8, 16, 16]}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-vCPU machine a tiny step ran 20x slower with 2 threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, name, train, **sections):
    cfg = tiny_config(name, tmp_path / "artifacts", model=MODEL, **sections)
    cfg["train"] = train
    return load_config(write_config(tmp_path / f"{name}.yaml", cfg))


def _train(cfg):
    from edgecli.stages import train

    store = ArtifactStore(cfg.artifacts_dir, cfg.name)
    return train.run(cfg, store, quiet=True), store


# --------------------------------------------------------------------------- DP-SGD


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    cfg = _cfg(d, "dp", {"epochs": 3, "batch_size": 64, "lr": 0.01, "scheduler": "none",
                         "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5,
                                     "fix_batchnorm": True}})
    res, store = _train(cfg)
    return cfg, res, store


def test_dp_epsilon_is_reported_and_grows_with_epochs(dp_run):
    cfg, res, store = dp_run
    metrics = json.loads((store.stage_dir("train") / "metrics.json").read_text())
    man = store.manifest("train")
    eps = [h["epsilon"] for h in man["history"]]
    assert len(eps) == 3 and all(np.isfinite(eps)) and eps[0] > 0
    assert eps[0] < eps[1] < eps[2], eps  # the accountant composes: every epoch spends more
    assert metrics["privacy"]["epsilon"] == pytest.approx(eps[-1], rel=1e-3)
    assert man["metrics"]["epsilon"] == pytest.approx(eps[-1], rel=1e-3)
    assert man["privacy"]["delta"] == 1e-5 and man["privacy"]["poisson_sampling"] is True
    assert man["model_info"]["norm_fix"] == "batchnorm->groupnorm"


def test_dp_fixed_noise_epsilon_matches_opacus_accountant(dp_run):
    """The ε edgecli reports is what Opacus' accountant gives for the steps it took."""
    from opacus.accountants import PRVAccountant

    cfg, res, store = dp_run
    man = store.manifest("train")
    q = man["privacy"]["sample_rate"]
    acc = PRVAccountant()
    steps = round(1 / q) * 3
    acc.history = [(1.0, q, steps)]
    assert man["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.02)


def test_dp_model_goes_through_export_and_the_card_carries_epsilon(dp_run):
    from edgecli.stages import export

    cfg, res, store = dp_run
    r = export.run(cfg, store, quiet=True)
    card = json.loads((r.dir / "card.json").read_text())
    assert card["privacy"]["epsilon"] == pytest.approx(store.manifest("train")["privacy"]["epsilon"])
    assert card["privacy"]["delta"] == 1e-5


def test_dp_target_epsilon_is_met(tmp_path):
    cfg = _cfg(tmp_path, "dpt", {"epochs": 2, "batch_size": 128, "lr": 0.01,
                                 "privacy": {"target_epsilon": 3.0, "delta": 1e-5, "fix_batchnorm": True}})
    res, store = _train(cfg)
    eps = store.manifest("train")["privacy"]["epsilon"]
    assert 2.5 < eps <= 3.0 + 1e-2  # Opacus picks the noise for 2 epochs; ε lands just under the target


def test_batchnorm_without_fix_is_a_one_line_config_error(tmp_path):
    cfg = tiny_config("bn", tmp_path / "artifacts", model=MODEL)
    cfg["train"] = {"epochs": 1, "privacy": {"target_epsilon": 8.0}}
    path = write_config(tmp_path / "bn.yaml", cfg)
    r = cli("train", "-c", str(path), "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("config error: train.privacy:") and "fix_batchnorm" in lines[0]
    assert "BatchNorm" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "artifacts" / "bn" / "train").exists()
    # validate says so too, before anyone runs train (it said "ok")
    r = cli("validate", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == lines, (r.returncode, r.stdout, r.stderr)
    cfg["train"]["privacy"]["fix_batchnorm"] = True
    r = cli("validate", "-c", str(write_config(tmp_path / "bn.yaml", cfg)), cwd=tmp_path)
    assert r.returncode == 0 and "replaced 3 BatchNorm layers by GroupNorm" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("args, says", [
    ({"channels": [30, 32], "groups": 4}, "groups=4 does not divide 30 channels"),
    ({"channels": [32, 32], "groups": 0}, "groups must be a positive number"),  # was ZeroDivisionError, exit 1
    ({"channels": [32, -8], "groups": 4}, "channels must be positive, got -8"),
])
def test_dpcnn_args_it_cannot_build_are_one_config_error_line(tmp_path, args, says):
    cfg = tiny_config("dpargs", tmp_path / "artifacts", model={"arch": "dpcnn", "args": args})
    path = write_config(tmp_path / "dpargs.yaml", cfg)
    for cmd in (["validate"], ["train", "-q"]):
        r = cli(*cmd, "-c", str(path), cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("config error: model:"), (cmd, r.stderr)
        assert says in lines[0], lines[0]
    assert not (tmp_path / "artifacts" / "dpargs" / "train").exists()


def test_dpcnn_trains_privately_without_the_batchnorm_fix_and_warns_about_dataset_statistics(tmp_path):
    """dpcnn (GroupNorm + tanh) needs no fix_batchnorm; per_dataset normalisation is named as outside ε,
    normalize: none is not; the model goes through compress and export like any other."""
    from opacus.validators import ModuleValidator

    from edgecli.models import build_model
    from edgecli.stages import export

    assert ModuleValidator.validate(build_model("dpcnn", [1, 8, 8], 10), strict=True) == []
    train = {"epochs": 1, "batch_size": 256, "optimizer": "sgd", "lr": 1.0, "weight_decay": 0.0,
             "scheduler": "none", "privacy": {"target_epsilon": 8.0, "delta": 1e-5}}
    runs = {}
    for norm in ("per_dataset", "none"):
        cfg = tiny_config(f"dpcnn-{norm}", tmp_path / "artifacts", model={"arch": "dpcnn"},
                          data={"dataset": "digits", "val_split": 0.2, "test_split": 0.2,
                                "preprocess": {"normalize": norm}})
        cfg["train"] = train
        runs[norm] = _train(load_config(write_config(tmp_path / f"{norm}.yaml", cfg)))
    for norm, (res, store) in runs.items():
        said = " ".join(res.messages)
        assert ("outside the DP-SGD guarantee" in said) == (norm == "per_dataset"), said
        assert "GroupNorm" not in said  # nothing was replaced
        assert 0 < store.manifest("train")["privacy"]["epsilon"] <= 8.0 + 1e-2
        assert res.metrics["test_accuracy"] > 0.2  # 1 noisy epoch: above chance (0.1), not a figure
    cfg = load_config(write_config(tmp_path / "none.yaml", dict(
        tiny_config("dpcnn-none", tmp_path / "artifacts", model={"arch": "dpcnn"},
                    data={"dataset": "digits", "val_split": 0.2, "test_split": 0.2,
                          "preprocess": {"normalize": "none"}}),
        train=train, compress={"input": "train", "steps": [{"quantize": {"mode": "dynamic"}}], "objective": "size"})))
    store = runs["none"][1]
    from edgecli.stages import compress

    compress.run(cfg, store, quiet=True)
    export.run(cfg, store, quiet=True)
    card = json.loads(store.require("export", "card.json").read_text())
    assert card["privacy"]["epsilon"] == pytest.approx(store.manifest("train")["privacy"]["epsilon"])


def test_privacy_and_federated_config_rules(tmp_path):
    cfg = tiny_config("rules", tmp_path / "artifacts")
    cfg["train"] = {"epochs": 1, "privacy": {"target_epsilon": 8.0, "noise_multiplier": 1.0},
                    "federated": {"clients": 3, "min_available_clients": 4, "strategy": "fedprox"}}
    path = write_config(tmp_path / "rules.yaml", cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = "\n".join(e.value.problems)
    assert f"{path}:" in text
    assert "train.privacy: give exactly one of target_epsilon and noise_multiplier" in text
    assert "train.federated: min_available_clients (4) is more than clients (3)" in text
    with pytest.raises(ConfigError, match=r"train.privacy.target_epsilom: unknown key \(did you mean 'target_epsilon'"):
        load_config(path, ["train.privacy.target_epsilon=null", "train.privacy.target_epsilom=8"])


def test_dp_sgd_is_repeatable_from_the_seed():
    """Same seed, same Poisson batches and noise: identical weights (fit on a tiny MLP, in-process)."""
    import torch

    from edgecli.config import PrivacyConfig, TrainConfig
    from edgecli.models.zoo import MLP
    from edgecli.privacy import DPSGD
    from edgecli.training import fit, seed_everything

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    tcfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    pcfg = PrivacyConfig(noise_multiplier=1.0)
    out = []
    for _ in range(2):
        seed_everything(3)
        m = MLP([8], 2, hidden=(16,))
        fit(m, x, y, None, None, tcfg, num_classes=2, seed=3, quiet=True, private=DPSGD(pcfg))
        out.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(out[0], out[1])


# --------------------------------------------------------------------------- federated


FED = {"clients": 3, "rounds": 2, "local_epochs": 1, "partition": "iid"}


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    cfg = _cfg(d, "fed", {"epochs": 1, "batch_size": 32, "lr": 0.01, "federated": FED},
               compress={"steps": [{"quantize": {"mode": "dynamic"}}]})
    res, store = _train(cfg)
    return cfg, res, store


def test_federated_publishes_one_train_stage_that_compress_and_export_accept(fed_run):
    from edgecli.stages import compress, export

    cfg, res, store = fed_run
    assert res.status == "done"
    assert sorted(p.name for p in store.run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["train"]
    man = store.manifest("train")
    assert man["federated"]["clients"] == 3 and man["federated"]["rounds_run"] == 2
    rounds = json.loads((store.stage_dir("train") / "metrics.json").read_text())["federated"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients"] == 3 for r in rounds)
    assert man["metrics"]["test_accuracy"] > 0.3  # 2 rounds of 3 clients: well above chance (0.1)
    c = compress.run(cfg, store, quiet=True)
    e = export.run(cfg, store, quiet=True)
    assert c.status == "done" and e.status == "done"
    card = json.loads((e.dir / "card.json").read_text())
    assert card["federated"]["clients"] == 3 and "privacy" not in card


def _fed_cfg(tmp_path, name, fed, privacy=None):
    train = {"epochs": 1, "batch_size": 32, "lr": 0.01, "federated": fed}
    if privacy:
        train["privacy"] = privacy
    return _cfg(tmp_path, name, train)


def test_only_parameters_cross_the_client_boundary_and_dp_clients_report_epsilon(tmp_path):
    """Every reply that crossed Flower's serialisation holds the model's tensors and three numbers."""
    from edgecli.data import load_splits
    from edgecli.federated import build_client_model, run_federated

    cfg = _fed_cfg(tmp_path, "boundary", {**FED, "partition": "dirichlet", "alpha": 0.5},
                   {"noise_multiplier": 1.0, "fix_batchnorm": True})
    splits = load_splits(cfg)
    res, grid = run_federated(cfg, splits, config_path=cfg.source, overrides=[], quiet=True)
    want = {k: tuple(v.shape) for k, v in build_client_model(cfg, [1, 8, 8], 10).state_dict().items()}
    assert sorted(grid.replies) == [1, 2]
    for replies in grid.replies.values():
        assert len(replies) == 3
        for r in replies:
            c = r.content
            assert list(c.array_records) == ["arrays"] and list(c.metric_records) == ["metrics"]
            assert not list(c.config_records)
            got = {k: tuple(a.shape) for k, a in c["arrays"].items()}
            assert got == want  # the model's tensors, nothing shaped like a batch of samples
            assert set(c["metrics"]) == {"num-examples", "train_loss", "epsilon"}
            assert all(isinstance(v, (int, float)) for v in c["metrics"].values())
    eps = [r["epsilon"] for r in res.rounds]
    assert 0 < eps[0] < eps[1]  # each client's accountant persists across rounds in its Context


def test_a_crashing_client_is_named_and_the_round_continues_or_stops(tmp_path):
    from flwr.clientapp import ClientApp

    from edgecli.data import load_splits
    from edgecli.federated import FederatedRoundFailed, client_train, run_federated

    crashing = ClientApp()

    @crashing.train()
    def _train(msg, context):
        if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 2:
            raise RuntimeError("device ran out of battery")
        return client_train(msg, context)

    cfg = _fed_cfg(tmp_path, "crash", {**FED, "min_available_clients": 2})
    splits = load_splits(cfg)
    res, grid = run_federated(cfg, splits, config_path=cfg.source, overrides=[], quiet=True, client_app=crashing)
    assert [r["failed_clients"] for r in res.rounds] == [[], [1]]
    assert [r["clients"] for r in res.rounds] == [3, 2]
    assert "device ran out of battery" in grid.failures[2][1]

    cfg = _fed_cfg(tmp_path, "crash2", {**FED, "min_available_clients": 3})
    with pytest.raises(FederatedRoundFailed) as e:
        run_federated(cfg, splits, config_path=cfg.source, overrides=[], quiet=True, client_app=crashing)
    msg = e.value.message
    assert "federated round 2: 2 of 3 sampled clients returned an update" in msg
    assert "client 1: RuntimeError: device ran out of battery" in msg and "nothing was published" in msg


def test_federated_is_repeatable_from_the_seed(tmp_path, fed_run):
    cfg, res, store = fed_run
    again, store2 = _train(_cfg(tmp_path, "fed", {"epochs": 1, "batch_size": 32, "lr": 0.01, "federated": FED}))
    a = [r["val_accuracy"] for r in store.manifest("train")["history"]]
    b = [r["val_accuracy"] for r in store2.manifest("train")["history"]]
    assert a == b
    w1 = (store.stage_dir("train") / "weights.safetensors").read_bytes()
    w2 = (store2.stage_dir("train") / "weights.safetensors").read_bytes()
    assert w1 == w2


def test_dirichlet_partition_covers_every_sample_once_with_label_skew():
    from edgecli.federated import partition

    y = np.repeat(np.arange(10), 100)
    parts = partition(y, 10, "dirichlet", 0.5, seed=0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert all(len(p) >= 2 for p in parts)
    again = partition(y, 10, "dirichlet", 0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # label skew: the biggest class share per client is far above the iid 10%
    top = [np.bincount(y[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top) > 0.3
    iid = partition(y, 10, "iid", 0.5, seed=0)
    assert max(np.bincount(y[p], minlength=10).max() / len(p) for p in iid) < 0.25


def test_a_supernode_with_its_own_data_trains_on_all_of_it(tmp_path):
    """Deployment: node config ``data-path`` replaces the seeded shard with the device's own dataset."""
    from flwr.app import Context, RecordDict
    from sklearn.datasets import load_digits

    from edgecli.federated import _client_env

    d = load_digits()
    for name, sl in (("server", slice(0, 600)), ("device", slice(600, 800))):
        x = np.round(d.images[sl] * 255 / 16).astype(np.uint8)
        np.savez(tmp_path / f"{name}.npz", x=x, y=d.target[sl])
    cfg = tiny_config("own", tmp_path / "artifacts", model=MODEL,
                      data={"dataset": "npz", "path": str(tmp_path / "server.npz"), "val_split": 0.2, "test_split": 0.2})
    cfg["train"] = {"epochs": 1, "federated": {"clients": 4, "rounds": 1}}
    path = write_config(tmp_path / "own.yaml", cfg)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "data-path": str(tmp_path / "device.npz")},
                  state=RecordDict(), run_config={"edgecli-config": str(path), "edgecli-set": ""})
    env = _client_env(ctx)
    assert len(env.y) == 120  # the device's 200 samples minus its 20% val and 20% test splits
    ctx = Context(run_id=1, node_id=8, node_config={"partition-id": 2}, state=RecordDict(),
                  run_config={"edgecli-config": str(path), "edgecli-set": ""})
    assert len(_client_env(ctx).y) == 90  # shard 2 of 4 of the server config's 360 training samples
