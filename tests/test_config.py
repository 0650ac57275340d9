"""Pipeline config: schema, line-numbered errors, did-you-mean, --set overrides."""

from __future__ import annotations

import pytest

from edgecli.config import load_config
from edgecli.errors import ConfigError
from tests.conftest import REPO, cli, edgecli


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_config_loads_with_defaults():
    cfg = load_config(REPO / "configs/digits-cnn.yaml")
    assert cfg.name == "digits-cnn"
    assert cfg.model.arch == "cnn"
    assert cfg.train.epochs >= 1
    assert cfg.infer.top_k == 3


def test_set_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = _write(tmp_path, "name: x\ntrain: {epochs: 5}\n")
    cfg = load_config(p, ["train.epochs=3", "train.lr=1e-3", "data.preprocess.resize=[16, 16]", "train.freeze=[features]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.preprocess.resize == (16, 16)
    assert cfg.train.freeze == ["features"]


def test_bad_set_value_names_key_and_origin(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.epochs=abc"])
    assert e.value.problems == [f"{p} --set train.epochs: Input should be a valid integer, unable to parse string as an integer (got 'abc')"]


def test_unknown_key_suggests_the_right_one_with_line(tmp_path):
    p = _write(tmp_path, "name: x\ntrain:\n  epochs: 3\n  learning_rate: 0.1\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    probs = e.value.problems
    assert f"{p}:5 train.batchsize: unknown key (did you mean 'batch_size'?)" in probs
    assert any(s.startswith(f"{p}:4 train.learning_rate: unknown key") for s in probs)


def test_all_problems_reported_at_once(tmp_path):
    p = _write(tmp_path, "name: x\ntrain:\n  epochs: -1\n  lr: -1\n  optimizer: adam\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    keys = [s.split(" ")[1].rstrip(":") for s in e.value.problems]
    assert sorted(keys) == ["train.epochs", "train.lr", "train.optimizer"]
    assert f"{p}:3 train.epochs: Input should be greater than or equal to 0 (got -1)" in e.value.problems


def test_duplicate_keys_are_rejected(tmp_path):
    p = _write(tmp_path, "name: x\ntrain:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4 train.epochs: duplicate key \(first set on line 3\)"):
        load_config(p)


def test_python_tags_are_refused_and_never_run(tmp_path):
    canary = tmp_path / "canary"
    p = _write(tmp_path, f"name: !!python/object/apply:os.system ['touch {canary}']\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1:7"):
        load_config(p)
    assert not canary.exists()


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = _write(tmp_path, "name: x\ntrain: {epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3:1: "):
        load_config(p)


def test_missing_name_and_bad_name(tmp_path):
    with pytest.raises(ConfigError, match="name: required key is missing"):
        load_config(_write(tmp_path, "seed: 1\n"))
    with pytest.raises(ConfigError, match="name: String should match pattern"):
        load_config(_write(tmp_path, "name: ../escape\n"))


def test_cli_epochs_abc_one_line_exit_2():
    r = edgecli("train", "-c", str(REPO / "configs/digits-cnn.yaml"), "--set", "train.epochs=abc")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epochs" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_unknown_key_did_you_mean(tmp_path):
    r = edgecli("train", "-c", str(REPO / "configs/digits-cnn.yaml"), "--set", "train.epoch=3")
    assert r.returncode == 2
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in r.stderr


def test_dry_run_prints_resolved_config(tmp_path):
    r = edgecli("train", "-c", str(REPO / "configs/digits-cnn.yaml"), "--set", "train.epochs=2", "--dry-run")
    assert r.returncode == 0, r.stderr
    import yaml

    assert yaml.safe_load(r.stdout)["train"]["epochs"] == 2


QUANTIZE_RULES = ("name: x\ncompress:\n  steps:\n    - quantize:\n        mode: int4_weight_only\n"
                  "        block_size: 48\n    - quantize:\n        format: qoperator\n        mode: dynamic\n")


def test_quantize_cross_field_rules_name_the_key_and_its_line(tmp_path):
    p = _write(tmp_path, QUANTIZE_RULES)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [
        f"{p}:6 compress.steps.0.quantize.block_size: must be a power of two >= 16 (got 48)",
        f"{p}:8 compress.steps.1.quantize.format: qoperator applies to static quantization only (mode is dynamic) "
        "(got 'qoperator')"]
    load_config(p, ["compress.steps.0.quantize.block_size=64", "compress.steps.1.quantize.mode=static"])


@pytest.mark.parametrize("cmd", [["validate"], ["compress", "--dry-run"]])
def test_validate_and_dry_run_report_quantize_rules_with_file_line(tmp_path, cmd):
    p = _write(tmp_path, QUANTIZE_RULES)
    r = cli(*cmd, "-c", str(p))
    assert r.returncode == 2 and r.stdout == ""
    assert f"{p}:6 compress.steps.0.quantize.block_size: must be a power of two" in r.stderr
    assert f"{p}:8 compress.steps.1.quantize.format: qoperator applies to static" in r.stderr
