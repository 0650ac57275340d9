"""Hardening, family 1: hostile and broken pipeline configs, through the real CLI.

Each case asserts the exit code, the one-line message (one line per problem, each starting with
the error kind, no traceback) and that nothing outside the expected files changed. The helpers
here (``snapshot``, ``assert_user_error``) are shared by the other ``test_hardening_*`` modules.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import edgecli

ANSI = "\x1b["


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash ("dir" for directories, link target for links)."""
    out: dict[str, str] = {}
    root = Path(root)
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif not p.is_file():  # a FIFO or device: reading it would block
                out[rel] = "special"
            else:
                try:
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError:
                    out[rel] = "unreadable"
    return out


def assert_user_error(r, code: int, kind: str, *needles: str, lines: int = 1) -> list[str]:
    """The process failed with ``code`` and said why in ``lines`` line(s) starting with ``kind``.

    Other stderr lines may be progress or hints, never a traceback; stdout stays empty or JSON.
    """
    assert r.returncode == code, f"exit {r.returncode} != {code}\nstderr: {r.stderr}\nstdout: {r.stdout}"
    assert "Traceback" not in r.stderr, r.stderr
    said = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{kind}:")]
    assert len(said) == lines, f"expected {lines} '{kind}:' line(s), got:\n{r.stderr}"
    for n in needles:
        assert any(n in ln for ln in said), f"{n!r} not in {said}"
    assert ANSI not in r.stdout and ANSI not in "\n".join(said)
    return said


def _write(d: Path, text: str, name: str = "c.yaml") -> Path:
    p = d / name
    p.write_text(text)
    return p


BASE = "name: x\nartifacts_dir: {art}\n"


def _run(tmp_path: Path, text: str, *extra: str, cmd: str = "train"):
    cfg = _write(tmp_path, text.replace("{art}", str(tmp_path / "art")))
    before = snapshot(tmp_path)
    r = edgecli(cmd, "-c", str(cfg), *extra, cwd=tmp_path, timeout=120)
    assert snapshot(tmp_path) == before, "a refused config changed files"
    return r, cfg


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    r, cfg = _run(tmp_path, BASE + "train: {epochs: 3\n  lr: 0.1\n")
    (line,) = assert_user_error(r, 2, "config error", f"{cfg}:")
    where = line.split(" ")[2]  # "config error: <file>:<line>:<col>: ..."
    _, ln, col = where.rstrip(":").rsplit(":", 2)
    assert ln.isdigit() and col.isdigit() and int(ln) >= 3
    assert r.stdout == ""


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {canary}']",
    "!!python/object/new:subprocess.Popen [['touch', '{canary}']]",
    "!!python/name:os.system",
    "!!python/object/apply:builtins.exec ['open(\"{canary}\", \"w\")']",
])
def test_python_tags_are_refused_and_never_run(tmp_path, tag):
    canary = tmp_path / "canary"
    r, cfg = _run(tmp_path, BASE + "seed: " + tag.replace("{canary}", str(canary)) + "\n")
    assert_user_error(r, 2, "config error", f"{cfg}:3:7", "refused")
    assert not canary.exists()


def test_python_tag_in_set_override_is_only_a_string(tmp_path):
    canary = tmp_path / "canary"
    r, _ = _run(tmp_path, BASE, "--set", f"seed=!!python/object/apply:os.system ['touch {canary}']")
    assert_user_error(r, 2, "config error", "--set seed")
    assert not canary.exists()


def test_duplicate_keys_name_both_lines(tmp_path):
    r, cfg = _run(tmp_path, BASE + "train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\nseed: 1\nseed: 2\n")
    assert_user_error(r, 2, "config error", f"{cfg}:6 train.epochs: duplicate key (first set on line 4)",
                      f"{cfg}:8 seed: duplicate key (first set on line 7)", lines=2)


def test_unknown_keys_get_suggestions_at_every_depth(tmp_path):
    text = BASE + "trian: {epochs: 1}\ndata:\n  preprocess:\n    resise: [8, 8]\ntrain:\n  batchsize: 8\n"
    r, cfg = _run(tmp_path, text)
    assert_user_error(r, 2, "config error",
                      f"{cfg}:3 trian: unknown key (did you mean 'train'?)",
                      f"{cfg}:6 data.preprocess.resise: unknown key (did you mean 'resize'?)",
                      f"{cfg}:8 train.batchsize: unknown key (did you mean 'batch_size'?)", lines=3)


def test_wrong_types_and_ranges_are_all_reported_at_once(tmp_path):
    text = BASE + ("train:\n  epochs: many\n  lr: -1\n  optimizer: adam\n  device: tpu\n"
                   "data:\n  val_split: 2\nbench:\n  batch_sizes: [1, 0]\n")
    r, cfg = _run(tmp_path, text)
    said = assert_user_error(r, 2, "config error", f"{cfg}:4 train.epochs: Input should be a valid integer",
                             f"{cfg}:5 train.lr: Input should be greater than 0 (got -1)",
                             f"{cfg}:6 train.optimizer:", f"{cfg}:7 train.device: must be auto, cpu, cuda or cuda:N",
                             f"{cfg}:9 data.val_split:", f"{cfg}:11 bench.batch_sizes.1:", lines=6)
    assert len({s.split(" ")[3] for s in said}) == 6  # six distinct keys, each once


def test_validate_command_reports_the_same_problems(tmp_path):
    r, cfg = _run(tmp_path, BASE + "train:\n  epochs: -1\n  batchsize: 3\n", cmd="validate")
    assert_user_error(r, 2, "config error", f"{cfg}:4 train.epochs", "did you mean 'batch_size'", lines=2)


@pytest.mark.parametrize("override,needle", [
    ("train.epochs", "expected key.path=value"),
    ("=3", "empty key path"),
    ("train..lr=1", "empty key path"),
    ("name.sub=3", "name is not a section"),
    ("train.freeze.7=x", "is not an index of the list"),
    ("train.epochs=abc", "--set train.epochs: Input should be a valid integer"),
    ("train.epochs=[1", "--set train.epochs"),
    ("train.lr=-0.5", "--set train.lr: Input should be greater than 0"),
    ("train.lerning_rate=0.1", "train.lerning_rate: unknown key"),
    ("train.epoch=2", "did you mean 'epochs'"),
])
def test_bad_set_overrides(tmp_path, override, needle):
    r, _ = _run(tmp_path, BASE, "--set", override)
    assert_user_error(r, 2, "config error", needle)
    assert r.stdout == ""


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


@pytest.mark.parametrize("text,needle", [
    ("lol: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + LAUGHS, "after expanding YAML aliases"),
    ("model:\n  args: &a\n    again: *a\n", "YAML alias refers to itself"),
    ("model:\n  args:\n    deep: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_alias_bombs_and_deep_nesting_are_refused_quickly(tmp_path, text, needle):
    r, _ = _run(tmp_path, BASE + text)  # the 120 s subprocess timeout is the "quickly"
    assert_user_error(r, 2, "config error", "refused", needle)


def test_alias_bomb_in_set_override_is_refused(tmp_path):
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1]," + ",".join(
        f"&{c} [{','.join([f'*{p}'] * 10)}]" for p, c in zip("abcdef", "bcdefg", strict=True)) + "]"
    r, _ = _run(tmp_path, BASE, "--set", f"model.args.k={bomb}")
    assert_user_error(r, 2, "config error", "--set model.args.k", "refused")


def test_plain_aliases_still_work(tmp_path):
    r, _ = _run(tmp_path, BASE + "defaults: &d {epochs: 2}\n", "--dry-run")
    assert_user_error(r, 2, "config error", "defaults: unknown key")  # aliases are fine, the key is not
    cfg = _write(tmp_path, "name: x\ntrain: &t {epochs: 2, lr: 0.01}\nmodel: {arch: cnn, args: {k: *t}}\n", "ok.yaml")
    r = edgecli("train", "-c", str(cfg), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epochs: 2" in r.stdout


@pytest.mark.parametrize("case,needle", [
    ("missing", "config file not found"),
    ("dir", "is a directory"),
    ("binary", "not a text file"),
    ("list", "top level must be a mapping"),
    ("scalar", "top level must be a mapping"),
    ("empty", "name: required key is missing"),
])
def test_unusable_config_files(tmp_path, case, needle):
    target = tmp_path / "c.yaml"
    if case == "dir":
        target.mkdir()
    elif case == "binary":
        target.write_bytes(b"name: x\n\xff\xfe\x00\x01")
    elif case == "list":
        target.write_text("- a\n- b\n")
    elif case == "scalar":
        target.write_text("just a string\n")
    elif case == "empty":
        target.write_text("")
    before = snapshot(tmp_path)
    r = edgecli("train", "-c", str(target), cwd=tmp_path)
    assert_user_error(r, 2, "config error", needle)
    assert snapshot(tmp_path) == before


def test_name_cannot_escape_the_artifacts_directory(tmp_path):
    for bad in ("../escape", "/abs", "a/b", ".hidden"):
        r, _ = _run(tmp_path, f"name: '{bad}'\nartifacts_dir: {tmp_path / 'art'}\n")
        assert_user_error(r, 2, "config error", "name: String should match pattern")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "art").exists()
