"""The artifacts directory: run/stage directories, manifests, hashing, atomic publish, locks.

Layout: ``<artifacts_dir>/<name>/<stage>/`` holding the stage's files and ``manifest.json``.
A stage is built in a hidden temporary sibling (``.<stage>.tmp-<pid>``) and published with
``os.replace``, so a killed run never leaves a half-written stage that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecli import __version__
from edgecli.errors import ArtifactError, EdgeError, LockError, UsageError

STAGES = ("train", "compress", "export", "bench", "infer")
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "edgecli": __version__}
    for pkg in ("torch", "onnx", "onnxruntime", "numpy", "scikit-learn", "torch-pruning"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class StageWriter:
    """An in-progress stage: write files into ``dir``; ``publish`` makes them visible atomically."""

    store: ArtifactStore
    stage: str
    dir: Path
    started: float = field(default_factory=time.time)
    inputs: dict[str, str] = field(default_factory=dict)  # name -> sha256
    upstream: dict[str, str] = field(default_factory=dict)  # stage -> manifest sha256

    def path(self, name: str) -> Path:
        return self.dir / name

    def add_input(self, name: str, path: Path) -> None:
        self.inputs[name] = sha256_file(path)

    def add_upstream(self, stage: str) -> dict:
        """Record the upstream stage's manifest (and its hash); return the manifest."""
        mpath = self.store.stage_dir(stage) / MANIFEST
        self.upstream[stage] = sha256_file(mpath)
        return json.loads(mpath.read_text())


class ArtifactStore:
    """Run directory of one pipeline: ``<artifacts_dir>/<name>``."""

    def __init__(self, artifacts_dir: str | Path, name: str):
        self.root = Path(artifacts_dir)
        self.name = name
        self.run_dir = self.root / name
        self._lock_fd: int | None = None

    @classmethod
    def for_config(cls, cfg) -> ArtifactStore:
        return cls(cfg.artifacts_dir, cfg.name)

    # ------------------------------------------------------------------ paths
    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def checkpoint_dir(self, stage: str) -> Path:
        return self.run_dir / ".checkpoints" / stage

    def exists(self, stage: str) -> bool:
        return (self.stage_dir(stage) / MANIFEST).is_file()

    def manifest(self, stage: str) -> dict:
        mpath = self.stage_dir(stage) / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(
                f"no published '{stage}' stage in {self.run_dir}",
                hint=f"run `edgecli {stage} -c <config>` first",
            )
        try:
            return json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{mpath} is corrupt; rerun `edgecli {stage} -c <config> --force`") from None

    def require(self, stage: str, filename: str) -> Path:
        """Path of a file of a published stage, verified against the stage's manifest."""
        m = self.manifest(stage)
        p = self.stage_dir(stage) / filename
        if not p.is_file():
            raise ArtifactError(f"{p} is missing; rerun `edgecli {stage} -c <config> --force`")
        want = m.get("outputs", {}).get(filename)
        if want and sha256_file(p) != want:
            raise ArtifactError(f"{p} does not match its manifest (modified after publish?); rerun `edgecli {stage} -c <config> --force`")
        return p

    def verify(self, stage: str) -> bool:
        try:
            m = self.manifest(stage)
        except ArtifactError:
            return False
        for fname, digest in m.get("outputs", {}).items():
            p = self.stage_dir(stage) / fname
            if not p.is_file() or sha256_file(p) != digest:
                return False
        return True

    # ------------------------------------------------------------------ locking
    def check_writable(self) -> None:
        """Fail before long work starts if the artifacts directory cannot be written."""
        target = self.run_dir
        probe_dir = target
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise UsageError(f"{probe_dir} is not a directory; set artifacts_dir to a directory")
        if not os.access(probe_dir, os.W_OK | os.X_OK):
            raise UsageError(f"artifacts directory {probe_dir} is not writable")

    @contextlib.contextmanager
    def lock(self, command: str = ""):
        """Hold an exclusive lock on the run directory; a second writer fails fast naming the holder.

        The lock is a ``flock`` on ``.lock``: the kernel releases it when the holder dies, so a
        lock left by a killed run is reclaimed automatically.
        """
        self.check_writable()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {self.run_dir}: {e.strerror}") from None
        path = self.run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(Exception):
                info = json.loads(Path(path).read_text() or "{}")
                holder = f" by pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, since {info.get('started')})"
            os.close(fd)
            raise LockError(
                f"run directory {self.run_dir} is in use{holder}",
                hint="wait for it to finish, or use another `name` / `artifacts_dir`",
            ) from None
        stale = ""
        with contextlib.suppress(Exception):
            old = json.loads(Path(path).read_text() or "{}")
            if old.get("pid") and old.get("active"):
                stale = f"reclaimed a stale lock left by pid {old['pid']} ({old.get('command')})"
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(sys.argv[:3]),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "active": True,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._lock_fd = fd
        self.stale_lock_message = stale
        try:
            self._recover()
            yield self
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**info, "active": False}).encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._lock_fd = None

    def _recover(self) -> None:
        """Clean what a killed run left: temporary stage dirs; restore a stage caught mid-swap."""
        if not self.run_dir.is_dir():
            return
        # a checkpoint half-saved by a killed run (the last complete one stays beside it)
        for p in (self.run_dir / ".checkpoints").glob("*/.*.tmp-*"):
            p.unlink(missing_ok=True)
        for p in self.run_dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            elif p.name.startswith(".") and ".old-" in p.name:
                stage = p.name[1:].split(".old-")[0]
                if not self.stage_dir(stage).exists():
                    os.replace(p, self.stage_dir(stage))
                else:
                    shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ writing
    def begin(self, stage: str) -> StageWriter:
        if self._lock_fd is None:
            raise RuntimeError("ArtifactStore.begin() needs the run lock")
        tmp = self.run_dir / f".{stage}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return StageWriter(self, stage, tmp)

    def publish(self, w: StageWriter, *, config: dict, fingerprint: str, metrics: dict | None = None,
                extra: dict | None = None) -> Path:
        """Write the manifest and atomically replace ``<run>/<stage>`` with the writer's directory."""
        outputs = {
            p.name: sha256_file(p)
            for p in sorted(w.dir.iterdir())
            if p.is_file() and p.name != MANIFEST
        }
        manifest = {
            "stage": w.stage,
            "run": self.name,
            "fingerprint": fingerprint,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "duration_s": round(time.time() - w.started, 3),
            "config": config,
            "inputs": w.inputs,
            "upstream": w.upstream,
            "outputs": outputs,
            "metrics": metrics or {},
            "versions": package_versions(),
            **(extra or {}),
        }
        write_json_atomic(w.dir / MANIFEST, manifest)
        _fsync_dir(w.dir)
        final = self.stage_dir(w.stage)
        old = self.run_dir / f".{w.stage}.old-{os.getpid()}"
        try:
            if final.exists():
                os.replace(final, old)
            os.replace(w.dir, final)
        except OSError as e:
            if old.exists() and not final.exists():
                os.replace(old, final)
            if e.errno == errno.ENOSPC:
                raise EdgeError(f"disk full while publishing {final}; the previous {w.stage} stage is intact") from None
            raise
        _fsync_dir(self.run_dir)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def discard(self, w: StageWriter) -> None:
        shutil.rmtree(w.dir, ignore_errors=True)

    def up_to_date(self, stage: str, fingerprint: str) -> bool:
        """True when the published stage has this fingerprint and all its files verify."""
        if not self.exists(stage):
            return False
        try:
            m = self.manifest(stage)
        except ArtifactError:
            return False
        return m.get("fingerprint") == fingerprint and self.verify(stage)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def upstream_fingerprint(store: ArtifactStore, stage: str) -> str:
    """Hash of an upstream stage's manifest: changes whenever that stage is republished."""
    mpath = store.stage_dir(stage) / MANIFEST
    return sha256_file(mpath) if mpath.is_file() else ""
