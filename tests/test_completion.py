"""Shell completion (`edgecli --install-completion`): the script typer installs, and the answers it gets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("edgecli")  # the console script: completion keys on its name

pytestmark = pytest.mark.skipif(not EXE.exists(), reason="the edgecli console script is not installed beside python")


def _complete(words: str) -> list[str]:
    """What bash completion offers for the last of ``words``, as the installed script asks for it."""
    env = {**os.environ, "_EDGECLI_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    r = subprocess.run([str(EXE)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_help_lists_install_completion():
    r = subprocess.run([str(EXE), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--install-completion" in r.stdout and "--show-completion" in r.stdout


def test_show_completion_prints_a_script_for_edgecli():
    r = subprocess.run([str(EXE), "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "_EDGECLI_COMPLETE=complete_bash" in r.stdout and "complete -o default -F _edgecli_completion edgecli" in r.stdout


def test_completion_offers_commands_and_their_options():
    assert _complete("edgecli be") == ["bench"]
    assert _complete("edgecli bench --ba") == ["--baseline"]
    assert set(_complete("edgecli ")) >= {"train", "compress", "export", "bench", "infer", "serve", "validate"}
