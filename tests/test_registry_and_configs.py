"""Every shipped config validates and every name in it resolves; registries suggest names."""

from __future__ import annotations

import sys

import pytest

from edgecli.config import load_config
from edgecli.errors import ConfigError
from edgecli.validate import check_names
from tests.conftest import REPO, cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    check_names(cfg)
    text = path.read_text()
    assert text.startswith("#"), "every shipped config starts with a comment saying what it is for"


def test_unknown_model_gets_did_you_mean(tmp_path):
    cfg = load_config(REPO / "configs/digits-cnn.yaml", ["model.arch=resnet9"])
    with pytest.raises(ConfigError, match=r"model.arch: unknown model 'resnet9' \(did you mean 'resnet8'\?\)"):
        check_names(cfg)


def test_help_does_not_import_torch_or_onnxruntime():
    import subprocess

    code = ("import sys, edgecli.cli\n"
            "from typer.testing import CliRunner\n"
            "for args in (['--help'], ['train', '--help'], ['bench', '--help'], ['infer', '--help']):\n"
            "    r = CliRunner().invoke(edgecli.cli.app, args)\n"
            "    assert r.exit_code == 0, r.output\n"
            "bad = [m for m in ('torch', 'onnxruntime', 'onnx', 'sklearn') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_validate_command(tmp_path):
    r = cli("validate", "-c", str(REPO / "configs/digits-cnn.yaml"))
    assert r.returncode == 0 and "ok" in r.stdout
    r = cli("validate", "-c", str(REPO / "configs/digits-cnn.yaml"), "--set", "data.dataset=digit")
    assert r.returncode == 2 and "did you mean 'digits'" in r.stderr
