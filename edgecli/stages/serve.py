"""serve: the model behind a local HTTP endpoint, micro-batched (see edgecli/serving.py).

    edgecli serve -c CONFIG [--host 127.0.0.1] [--port 8080]

The model is ``serve.input`` (default: the export stage; any stage name or a model file), opened
once at start through the runtime layer (``serve.runtime``, default: the backend for the file's
suffix). The process serves that file until it stops: a new export is picked up by a restart.
SIGTERM stops accepting, answers every request already accepted, and exits 143; SIGINT exits 130.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from edgecli.artifacts import ArtifactStore
from edgecli.config import PipelineConfig
from edgecli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ConfigError, ModelFileError, UsageError
from edgecli.stages import Built, StageResult, run_stage

STAGE = "serve"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def resolve_model(cfg: PipelineConfig, store: ArtifactStore) -> Path:
    """The model file serve.input names (a stage's model.onnx, verified, or a file path)."""
    from edgecli.stages import resolve_model_input

    return resolve_model_input(store, cfg.serve.input, "serve.input", "a model file")


def api_key(cfg: PipelineConfig) -> str | None:
    """The API key named by serve.api_key_env; a set name with no value is a config error, not 'no key'."""
    env = cfg.serve.api_key_env
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key.strip():
        raise ConfigError(f"serve.api_key_env: the environment variable {env} is not set (or empty); "
                          "set it to the key clients must send, or remove serve.api_key_env")
    return key.strip()


@dataclass
class Stopped:
    """How the server ended: render's view."""

    by: object  # the signal that stopped it, or None
    ready: bool  # it listened at all
    accepted: int
    answered: int
    refused: int


def render(res: StageResult, s: Stopped) -> StageResult:
    """How the server stopped, and the exit code that calls for (143 SIGTERM, 130 SIGINT, 1 never started)."""
    why = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}.get(s.by, "its own end")
    res.messages.append(f"serve: stopped by {why}; answered {s.answered} of {s.accepted} accepted "
                        f"request(s), {s.refused} refused at the queue limit")
    if s.by == signal.SIGTERM:
        res.exit_code = EXIT_TERMINATED
    elif s.by == signal.SIGINT:
        res.exit_code = EXIT_INTERRUPTED
    elif not s.ready:
        res.exit_code = 1
        res.messages.append("serve: the server did not start (see the lines above)")
    return res


def run(cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, quiet: bool = False,
        host: str = "127.0.0.1", port: int = 8080, **_: object) -> StageResult:
    """Load the model, serve until a signal, return the exit code the signal calls for."""
    from edgecli import serving
    from edgecli.inputs import reader_for
    from edgecli.predict import Model
    from edgecli.report import info as log_info

    try:
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"serve: {e.name} is not installed; pip install -e '.[serve]'") from None

    def build(_w) -> Built:
        sc = cfg.serve
        key = api_key(cfg)
        if not 0 <= port <= 65535:
            raise UsageError(f"serve: --port {port} is not a TCP port (0-65535; 0 picks a free one)")
        path = resolve_model(cfg, store)
        model = Model(path, sc.threads, sc.providers, runtime=sc.runtime)
        if not model.inputs:
            raise ModelFileError(f"{path}: the model has no inputs")
        if model.is_embedding():
            raise UsageError(f"serve: {path} is an embedding model (output 'embedding', no labels); it has no classes to rank")
        reader = reader_for(model.info, model.inputs)
        k = min(sc.top_k, len(model.labels)) if model.labels else sc.top_k
        batcher = serving.Batcher(model, k=k, max_batch=sc.max_batch, max_wait_ms=sc.max_wait_ms,
                                  queue_limit=sc.queue_limit)
        app = serving.App(model, reader, batcher, serving.Settings(sc.max_request_bytes, key, sc.allow_path))
        sock = serving.bind(host, port)
        where = sock.getsockname()
        url = f"http://{'[' + where[0] + ']' if ':' in where[0] else where[0]}:{where[1]}"
        if host not in LOOPBACK and not quiet:
            log_info(f"serve: listening on {host}, not loopback: every host that can reach it can call it"
                     + ("" if key else " (no serve.api_key_env set: no key needed)"))

        def listening():
            # always printed (also with -q): the one line a supervisor or a test reads the port from
            print(f"serve: ready on {url} ({path}, sha256 {model.sha256[:16]}..., {model.runtime})",
                  file=sys.stderr, flush=True)

        stopped_by = serving.run(app, sock, on_listening=listening)
        return Built(metrics={"accepted": batcher.accepted, "answered": batcher.answered, "refused_503": batcher.refused,
                              "model": str(path), "model_sha256": model.sha256, "url": url},
                     view=Stopped(stopped_by, batcher.ready, batcher.accepted, batcher.answered, batcher.refused))

    return run_stage(store, STAGE, None, build, render)
