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
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecli import __version__
from edgecli.errors import ArtifactError, EdgeError, LockError, UsageError

STAGES = ("train", "compress", "export", "bench", "infer")
MANIFEST = "manifest.json"
# written by ``begin`` into every temporary stage directory: recovery removes only directories that
# carry it (or a valid manifest), never a user's folder that happens to match a name
MARKER = ".edgecli-stage"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_MANIFEST_LIMIT = 64 << 20


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def refuse_link(path: Path, what: str = "") -> None:
    """An ArtifactError when ``path`` is a symbolic link where edgecli keeps its own file or folder."""
    if _is_link(path):
        from edgecli.safeio import shown

        raise ArtifactError(f"{shown(path)} is a symbolic link where edgecli keeps {what or 'its own file'}; "
                            "refused (nothing is written through links); remove the link")


def own_dir(path: Path, what: str) -> Path:
    """``path`` as a real directory edgecli may write in: created if missing, never a link."""
    refuse_link(path, what)
    try:
        path.mkdir(exist_ok=True)
    except FileExistsError:
        raise ArtifactError(f"{path} is not a directory; edgecli keeps {what} there") from None
    refuse_link(path, what)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory; edgecli keeps {what} there")
    return path


def open_own(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode: int = 0o644) -> int:
    """Open a file edgecli creates in a run directory without following a link planted there."""
    try:
        return os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or _is_link(path):
            refuse_link(path)
        raise


def parse_manifest(text: str, where: str) -> dict:
    """A manifest's JSON, checked for the shape every reader relies on (an object with ``outputs``)."""
    try:
        m = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ArtifactError(f"{where} is corrupt (not JSON)") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{where} is not an edgecli manifest (a JSON {type(m).__name__}, not an object)")
    outs = m.get("outputs")
    if not isinstance(outs, dict):
        what = "has no 'outputs'" if outs is None else "has 'outputs' that is not an object"
        raise ArtifactError(f"{where} {what}: nothing it lists could be verified")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in outs.items()):
        raise ArtifactError(f"{where}: 'outputs' must map file names to sha256 strings")
    for k in outs:
        if k != os.path.basename(k) or k in ("", ".", ".."):
            raise ArtifactError(f"{where}: output {k!r} is not a file name in the stage directory")
    return m


def is_edgecli_dir(path: Path, stage: str | None = None) -> bool:
    """True for a real directory edgecli made: it holds ``begin``'s marker or a valid manifest."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    if (path / MARKER).is_file() and not _is_link(path / MARKER):
        return True
    mp = path / MANIFEST
    if _is_link(mp) or not mp.is_file():
        return False
    try:
        with open(mp, "rb") as f:
            m = parse_manifest(f.read(_MANIFEST_LIMIT).decode("utf-8"), str(mp))
    except (OSError, UnicodeDecodeError, ArtifactError):
        return False
    return stage is None or m.get("stage") in (None, stage)


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
    refuse_link(tmp)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of this pid; a link planted there is refused above
    with os.fdopen(open_own(tmp), "w", encoding="utf-8") as f:
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
    fingerprint: str = ""  # set by run_stage from the stage's declared inputs

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
        self.root = Path(artifacts_dir).expanduser()  # `artifacts_dir: ~/x` means the home directory
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
        """``<run>/.checkpoints/<stage>``; a link at either level is an ArtifactError (never written through)."""
        top = self.run_dir / ".checkpoints"
        refuse_link(top, "checkpoints")
        refuse_link(top / stage, "checkpoints")
        return top / stage

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
            with open(mpath, "rb") as f:
                text = f.read(_MANIFEST_LIMIT + 1)
            if len(text) > _MANIFEST_LIMIT:
                raise ArtifactError(f"{mpath} is over {_MANIFEST_LIMIT >> 20} MiB; not an edgecli manifest")
            return parse_manifest(text.decode("utf-8"), str(mpath))
        except UnicodeDecodeError:
            raise ArtifactError(f"{mpath} is corrupt; rerun `edgecli {stage} -c <config> --force`") from None
        except ArtifactError as e:
            raise ArtifactError(f"{e.message}; rerun `edgecli {stage} -c <config> --force`") from None

    def require(self, stage: str, filename: str) -> Path:
        """Path of a file of a published stage, verified against the stage's manifest."""
        m = self.manifest(stage)
        p = self.stage_dir(stage) / filename
        if not p.is_file():
            raise ArtifactError(f"{p} is missing; rerun `edgecli {stage} -c <config> --force`")
        want = m["outputs"].get(filename)
        if want is None:
            raise ArtifactError(f"{p} is not listed in its stage's manifest; rerun `edgecli {stage} -c <config> --force`")
        if sha256_file(p) != want:
            raise ArtifactError(f"{p} does not match its manifest (modified after publish?); rerun `edgecli {stage} -c <config> --force`")
        return p

    def verify(self, stage: str) -> bool:
        try:
            m = self.manifest(stage)
        except ArtifactError:
            return False
        if not m["outputs"]:
            return False
        for fname, digest in m["outputs"].items():
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
        refuse_link(self.run_dir / ".checkpoints", "checkpoints")
        path = self.run_dir / ".lock"
        fd = open_own(path, os.O_RDWR | os.O_CREAT)  # a link planted as .lock is refused, never truncated
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a hard link would be truncated like a symlink's target
            os.close(fd)
            raise ArtifactError(f"{path} is not a regular file of its own (a device, or a hard link to another file); "
                                "edgecli keeps its run lock there")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(Exception):
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
                holder = f" by pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, since {info.get('started')})"
            os.close(fd)
            raise LockError(
                f"run directory {self.run_dir} is in use{holder}",
                hint="wait for it to finish, or use another `name` / `artifacts_dir`",
            ) from None
        stale = ""
        with contextlib.suppress(Exception):
            old = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
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
        """Clean what a killed run left: temporary stage dirs; restore a stage caught mid-swap.

        Only what edgecli made is touched: directories carrying ``begin``'s marker or a valid
        manifest, and checkpoint temporaries inside real (not linked) checkpoint directories.
        """
        if not self.run_dir.is_dir():
            return
        # a checkpoint half-saved by a killed run (the last complete one stays beside it)
        top = self.run_dir / ".checkpoints"
        if top.is_dir() and not _is_link(top):
            for sub in top.iterdir():
                if _is_link(sub) or not sub.is_dir():
                    continue
                for p in sub.glob(".*.tmp-*"):
                    if _is_link(p) or p.is_file():
                        p.unlink(missing_ok=True)  # a link is removed itself, never its target
        for p in self.run_dir.iterdir():
            if not p.name.startswith("."):
                continue
            if ".tmp-" in p.name:
                if is_edgecli_dir(p):  # begin's marker, or a manifest: a stage a killed run was writing
                    shutil.rmtree(p, ignore_errors=True)
            elif ".old-" in p.name:
                stage = p.name[1:].split(".old-")[0]
                if stage not in STAGES or not is_edgecli_dir(p, stage):
                    continue
                final = self.stage_dir(stage)
                if not final.exists() and not _is_link(final):
                    os.replace(p, final)
                elif is_edgecli_dir(final, stage):
                    shutil.rmtree(p, ignore_errors=True)

    def _check_replaceable(self, stage: str) -> None:
        """Refuse (one line) to replace ``<run>/<stage>`` unless edgecli made it."""
        final = self.stage_dir(stage)
        refuse_link(final, f"the {stage} stage")
        if final.exists() and not is_edgecli_dir(final, stage):
            from edgecli.safeio import shown

            raise ArtifactError(f"{shown(final)} exists and was not made by edgecli (no edgecli manifest); refused to "
                                "replace it", hint="move it away, or choose another `name` / `artifacts_dir`")

    # ------------------------------------------------------------------ writing
    def begin(self, stage: str) -> StageWriter:
        if self._lock_fd is None:
            raise RuntimeError("ArtifactStore.begin() needs the run lock")
        self._check_replaceable(stage)  # before any work, not after minutes of training
        tmp = self.run_dir / f".{stage}.tmp-{os.getpid()}"
        refuse_link(tmp, "a temporary stage directory")
        if tmp.exists():
            if not is_edgecli_dir(tmp):
                raise ArtifactError(f"{tmp} exists and was not made by edgecli; refused to remove it")
            shutil.rmtree(tmp)
        tmp.mkdir()
        os.close(open_own(tmp / MARKER))
        return StageWriter(self, stage, tmp)

    def publish(self, w: StageWriter, *, config: dict, fingerprint: str, metrics: dict | None = None,
                extra: dict | None = None) -> Path:
        """Write the manifest and atomically replace ``<run>/<stage>`` with the writer's directory."""
        outputs = {
            p.name: sha256_file(p)
            for p in sorted(w.dir.iterdir())
            if p.is_file() and p.name not in (MANIFEST, MARKER)
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.dir / MARKER)  # the manifest marks it from now on
        _fsync_dir(w.dir)
        final = self.stage_dir(w.stage)
        self._check_replaceable(w.stage)
        old = self.run_dir / f".{w.stage}.old-{os.getpid()}"
        refuse_link(old, "a replaced stage")
        if old.exists():
            if not is_edgecli_dir(old):
                raise ArtifactError(f"{old} exists and was not made by edgecli; refused to replace it")
            shutil.rmtree(old)
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
        if is_edgecli_dir(w.dir):
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


def lineage_privacy(store: ArtifactStore, lineage: dict) -> dict:
    """The train manifest's privacy/federated record (ε spent, δ, ...) when this model descends from it.

    Only the train manifest whose hash is in the lineage counts: a train stage rerun since then
    does not describe this model.
    """
    out: dict = {}
    if "train" not in lineage or not store.exists("train"):
        return out
    mpath = store.stage_dir("train") / "manifest.json"
    if sha256_file(mpath) != lineage["train"]:
        return out
    man = json.loads(mpath.read_text())
    if man.get("privacy"):
        out["privacy"] = man["privacy"]
    if man.get("federated"):
        out["federated"] = man["federated"]
    return out


# --------------------------------------------------------------------------- declared inputs

HASH_CACHE = ".hashcache.json"


class HashCache:
    """(path, size, mtime_ns) -> sha256 of the files a run's stages read, kept beside the run.

    As DVC's state database: an unchanged 10,000-image folder is answered from ``stat`` alone,
    while a file whose size or modification time moved is hashed again. A file edited within the
    same nanosecond tick and size would be missed; editors and ``cp`` change mtime_ns.
    """

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            if not _is_link(path) and path.is_file():
                raw = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(raw, dict):
                    self.entries = {k: v for k, v in raw.items() if isinstance(v, list) and len(v) == 3}

    def sha256(self, path: Path) -> str:
        key = os.path.abspath(path)
        st = os.stat(path)
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns and isinstance(hit[2], str):
            return hit[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty and self.path.parent.is_dir():
            with contextlib.suppress(OSError, ArtifactError):
                write_json_atomic(self.path, self.entries)
            self.dirty = False


@dataclass
class Declared:
    """What a stage depends on: config sections, files it reads, upstream stages it reads.

    The stage fills it as it resolves its inputs (inside the run lock); the fingerprint is the hash
    of exactly this record, and the manifest's ``inputs`` / ``upstream`` list the same entries, so
    the skip decision and the record of what was read cannot drift apart (DVC's stage cache key is
    built from the lock entry it writes, the same way).
    """

    stage: str
    sections: dict
    files: dict[str, Path] = field(default_factory=dict)  # name shown in the manifest -> path
    upstream: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # name -> a digest known without a file

    def file(self, name: str, path: Path) -> None:
        self.files[name] = Path(path)

    def stage_input(self, stage: str) -> None:
        if stage not in self.upstream:
            self.upstream.append(stage)

    def digests(self, store: ArtifactStore) -> tuple[dict[str, str], dict[str, str]]:
        """(inputs name -> sha256, upstream stage -> manifest sha256), hashed through the run's cache."""
        cache = self._cache = HashCache(store.run_dir / HASH_CACHE)
        inputs = dict(self.values)
        for name, p in self.files.items():
            try:
                inputs[name] = cache.sha256(p)
            except OSError as e:
                from edgecli.safeio import shown

                raise ArtifactError(f"{self.stage}: cannot read its input {shown(p)} ({e.strerror})") from None
        upstream = {st: upstream_fingerprint(store, st) for st in self.upstream}
        return inputs, upstream

    def save_cache(self) -> None:
        """Keep the hashes for the next run: called once the stage has published or skipped (a failed
        run leaves nothing new in the run directory)."""
        cache = getattr(self, "_cache", None)
        if cache is not None:
            cache.save()

    def fingerprint(self, inputs: dict[str, str], upstream: dict[str, str]) -> str:
        return sha256_json({"stage": self.stage, "version": __version__, "sections": self.sections,
                            "inputs": inputs, "upstream": upstream})
