"""The HTTP server behind ``edgecli serve``: a raw ASGI app, a micro-batcher, Prometheus metrics.

Endpoints
- ``POST /v1/predict``: infer's JSON requests (one object, or a list of them; ``{"path": ...}`` refused
  unless ``serve.allow_path``), a ``multipart/form-data`` upload of image files, or one image as the
  body (``Content-Type: image/png``). The answer is infer's ``--json`` object (a list for a list, a
  batch or several files): top-k labels and probabilities, the model's sha256, its latency.
- ``GET /healthz`` (alive), ``GET /readyz`` (model loaded and warmed up), ``GET /v1/model`` (the card),
  ``GET /metrics`` (Prometheus text format).

Requests are parsed by the very reader infer uses (``edgecli.inputs``), then queued; one batcher task
takes up to ``max_batch`` rows (waiting at most ``max_wait_ms`` after the first for company), runs
them as one batch, and answers each request. A full queue answers 503 with ``Retry-After``.

Why a raw ASGI app rather than FastAPI or Starlette: benchmarks/serve.py measures the three side by
side on the same batcher and model; the request path here is a few dictionary look-ups, with no
routing tables, no pydantic per request and no middleware stack (figures in README "serve").
Multipart bodies are parsed with the standard library's ``email`` parser: the body is already whole
in memory and bounded by ``max_request_bytes``, so a streaming parser (python-multipart) would buy
nothing and add a dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgecli.inputs import Reader, Sample
from edgecli.predict import Model

# request end-to-end and queue-wait buckets, seconds: sub-millisecond resolution where a small model lives
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                   0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)
ENDPOINTS = {"/v1/predict": "predict", "/v1/model": "model", "/healthz": "healthz", "/readyz": "readyz",
             "/metrics": "metrics"}


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two servers in one process never mix)."""

    def __init__(self, queue_depth, ready, card: dict):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            disable_created_metrics,
        )

        disable_created_metrics()  # the *_created series double the scrape for nothing a dashboard reads
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgecli_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.e2e = Histogram("edgecli_request_seconds", "POST /v1/predict end to end in the server: body read, "
                             "parse, queue, model, answer", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("edgecli_queue_wait_seconds", "time a request waited in the queue for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.model_time = Histogram("edgecli_model_seconds", "the model's own time for one batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("edgecli_batch_size", "rows per model run", buckets=BATCH_BUCKETS, registry=r)
        depth = Gauge("edgecli_queue_depth", "requests waiting for a batch", registry=r)
        depth.set_function(queue_depth)  # read at scrape time: nothing to update per request
        rd = Gauge("edgecli_ready", "1 once the model is loaded and warmed up", registry=r)
        rd.set_function(ready)
        Info("edgecli_model", "the model this process serves", registry=r).info(
            {"path": card["path"], "sha256": card["sha256"], "runtime": card["runtime"]})
        self._children: dict = {}

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        c = self._children.get(key)
        if c is None:  # labels() costs a lock and a hash each time: keep the children
            c = self._children[key] = self.requests.labels(endpoint, str(status))
        c.inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


@dataclass
class Job:
    """One accepted request: its samples, rows, and the future its answer is set on."""

    samples: list[Sample]
    rows: int
    single: bool
    future: asyncio.Future
    t_queued: float = 0.0
    shape: tuple = ()


class Batcher:
    """Groups queued jobs into batches of at most ``max_batch`` rows and runs each batch once.

    The model runs in one worker thread (ONNX Runtime releases the GIL, so the event loop goes on
    reading and parsing requests meanwhile); the batching itself is on the event loop, where the
    requests are. At most one batch is in flight: whatever queues up while it runs is the next batch.
    """

    def __init__(self, model: Model, *, k: int, max_batch: int, max_wait_ms: float, queue_limit: int):
        self.model, self.k = model, k
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.queue: deque[Job] = deque()
        self.metrics: Metrics | None = None
        self.ready = False
        self.accepted = self.answered = self.refused = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgecli-model")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._warm_up)
        self.ready = True
        self._task = asyncio.create_task(self._loop())

    def _warm_up(self) -> None:
        # every batch size the first runs will meet: a new shape allocates (measured 3-7x a steady run)
        for rows in sorted({1, self.max_batch}):
            self.model.warm_up(self.model.zeros(rows))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ the queue
    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (nothing queued) when the queue is full."""
        if len(self.queue) >= self.queue_limit:
            self.refused += 1
            return False
        job.t_queued = time.perf_counter()
        self.queue.append(job)
        self.accepted += 1
        self._wake.set()
        return True

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        q = self.queue
        while True:
            if not q:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(0)  # let the requests already read queue up behind the first
            deadline = q[0].t_queued + self.max_wait
            while self._rows_queued() < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, rows = [], 0
            while q and rows + q[0].rows <= self.max_batch and (not batch or q[0].shape == batch[0].shape):
                job = q.popleft()
                batch.append(job)
                rows += job.rows
            now = time.perf_counter()
            for job in batch:
                self.metrics.queue_wait.observe(now - job.t_queued)
            try:
                answers = await loop.run_in_executor(self._pool, self._run, batch, rows)
            except Exception as e:  # noqa: BLE001 - one batch's failure is its requests' 500, not the server's end
                answers = [(500, {"error": f"the model failed on this batch ({_first_line(e)})"})] * len(batch)
            for job, ans in zip(batch, answers, strict=True):
                if not job.future.done():  # a client that went away cancelled its future
                    job.future.set_result(ans)
            self.answered += len(batch)

    def _rows_queued(self) -> int:
        return sum(j.rows for j in self.queue)

    # ------------------------------------------------------------------ the model (worker thread)
    def _run(self, batch: list[Job], rows: int) -> list[tuple[int, object]]:
        samples = [s for job in batch for s in job.samples]
        keys = list(samples[0].feeds)
        if len(samples) == 1:
            feeds = samples[0].feeds
        else:
            feeds = {k: np.concatenate([s.feeds[k] for s in samples]) for k in keys}
        try:
            probs, ms = self.model.run(feeds)
        except Exception as e:  # noqa: BLE001 - the runtime's shape/type errors: answer each request alone
            if len(batch) > 1:
                return [a for job in batch for a in self._run([job], job.rows)]
            return [(422, {"error": f"{samples[0].name}: the model rejected this input ({_first_line(e)})"})]
        self.metrics.model_time.observe(ms / 1000.0)
        self.metrics.batch.observe(rows)
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        labels, sha, lat = self.model.labels, self.model.sha256, round(ms, 4)
        out, i = [], 0
        for job in batch:
            answers = []
            for s in job.samples:
                for j in range(s.n):
                    p, idx = probs[i], order[i]
                    tk = [{"label": labels[c] if labels and c < len(labels) else str(int(c)), "index": int(c),
                           "prob": round(float(p[c]), 6)} for c in idx]
                    obj = {"input": s.names[j] if j < len(s.names) else s.name}
                    if s.id is not None:
                        obj["id"] = s.id
                    obj.update(top_k=tk, latency_ms=lat, batch=rows, model_sha256=sha)
                    answers.append(obj)
                    i += 1
            out.append((200, answers[0] if job.single and len(answers) == 1 else answers))
        return out


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


@dataclass
class Settings:
    max_request_bytes: int = 4 << 20
    api_key: str | None = None
    allow_path: bool = False
    retry_after_s: int = 1
    extra_headers: list = field(default_factory=list)


_JSON = [(b"content-type", b"application/json")]


class App:
    """The raw ASGI application: routes by path, reads bounded bodies, answers with one-line JSON errors."""

    def __init__(self, model: Model, reader: Reader, batcher: Batcher, settings: Settings):
        self.model, self.reader, self.batcher, self.settings = model, reader, batcher, settings
        self.card = model.card()
        self.metrics = Metrics(lambda: len(batcher.queue), lambda: 1 if batcher.ready else 0, self.card)
        batcher.metrics = self.metrics
        self._key = settings.api_key.encode() if settings.api_key else None
        self._card_body = json.dumps(self.card).encode()

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            return await self.http(scope, receive, send)
        if kind == "lifespan":
            return await self.lifespan(receive, send)
        raise RuntimeError(f"unsupported ASGI scope {kind}")  # websockets: uvicorn answers 403 itself

    async def lifespan(self, receive, send):
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.batcher.start()
                except Exception as e:  # noqa: BLE001 - reported by uvicorn as a failed startup
                    await send({"type": "lifespan.startup.failed", "message": _first_line(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ HTTP
    async def http(self, scope, receive, send):
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]
        endpoint = ENDPOINTS.get(path, "other")
        if endpoint == "predict":
            status, body, headers = await self.predict(scope, receive, method)
            self.metrics.e2e.observe(time.perf_counter() - t0)
        elif endpoint == "other":
            status, body, headers = _error(404, f"no endpoint {path[:100]}; see GET /v1/model, POST /v1/predict")
        elif method not in ("GET", "HEAD"):
            status, body, headers = 405, json.dumps({"error": f"{path} takes GET"}).encode(), _JSON + [(b"allow", b"GET")]
        elif endpoint == "healthz":
            status, body, headers = 200, b'{"status": "alive"}', _JSON
        elif endpoint == "readyz":
            ok = self.batcher.ready
            status, body, headers = (200 if ok else 503), (b'{"ready": true}' if ok else b'{"ready": false}'), _JSON
        elif not self._authorized(scope):
            status, body, headers = _unauthorized()
        elif endpoint == "model":
            status, body, headers = 200, self._card_body, _JSON
        else:
            from prometheus_client import CONTENT_TYPE_LATEST

            status, body, headers = 200, self.metrics.text(), [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        self.metrics.count(endpoint, status)
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body if method != "HEAD" else b""})

    def _authorized(self, scope) -> bool:
        if self._key is None:
            return True
        for k, v in scope["headers"]:
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                return hmac.compare_digest(v[7:].strip(), self._key)
            if k == b"x-api-key":
                return hmac.compare_digest(v.strip(), self._key)
        return False

    async def predict(self, scope, receive, method):
        if method != "POST":
            return 405, b'{"error": "/v1/predict takes POST"}', _JSON + [(b"allow", b"POST")]
        if not self._authorized(scope):
            return _unauthorized()
        ctype, length = b"", None
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v
            elif k == b"content-length":
                length = v
        limit = self.settings.max_request_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _error(413, f"request body over serve.max_request_bytes ({limit} bytes); refused")
        body = await _read_body(receive, limit)
        if body is None:
            return _error(413, f"request body over serve.max_request_bytes ({limit} bytes); refused")
        samples, single, err = self.parse(ctype, body)
        if err is not None:
            return err
        bad = next((s for s in samples if s.error), None)
        if bad is not None:
            return _error(400, bad.error)
        rows = sum(s.n for s in samples)
        if rows > self.batcher.max_batch:
            return _error(413, f"{rows} rows in one request; this server runs at most serve.max_batch = "
                               f"{self.batcher.max_batch} rows at once")
        if rows == 0:
            return _error(400, "the request holds no rows to answer")
        shape = tuple((k, v.shape[1:]) for s in samples[:1] for k, v in s.feeds.items())
        if any(tuple((k, v.shape[1:]) for k, v in s.feeds.items()) != shape for s in samples[1:]):
            return _error(400, "the items of one request have different shapes; send them as separate requests")
        job = Job(samples, rows, single, asyncio.get_running_loop().create_future(), shape=shape)
        if not self.batcher.submit(job):
            return 503, b'{"error": "the server is at its queue limit (serve.queue_limit); retry later"}', \
                _JSON + [(b"retry-after", str(self.settings.retry_after_s).encode())]
        status, ans = await job.future
        return status, json.dumps(ans, allow_nan=False).encode(), _JSON

    def parse(self, ctype: bytes, body: bytes):
        """(samples, one_object, None) or (None, None, an error answer) for one request body."""
        mime = ctype.split(b";", 1)[0].strip().lower()
        if mime in (b"application/json", b"") or mime.endswith(b"+json"):
            samples, single = self.reader.json_body(body, allow_path=self.settings.allow_path)
            return samples, single, None
        if mime == b"multipart/form-data":
            parts = _multipart(ctype, body)
            if isinstance(parts, str):
                return None, None, _error(400, parts)
            samples = [self.reader.upload(data, name) for name, data in parts]
            return samples, len(samples) == 1, None
        if mime.startswith(b"image/"):
            return [self.reader.upload(body, "upload")], True, None
        return None, None, _error(415, f"Content-Type {mime.decode('latin-1')[:60]!r} not taken; send "
                                       "application/json, multipart/form-data or image/* (curl -d needs -H 'Content-Type: application/json')")


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes (nothing more is buffered)."""
    msg = await receive()
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        return body if len(body) <= limit else None
    chunks, size = [body], len(body)
    while msg.get("more_body"):
        msg = await receive()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _multipart(ctype: bytes, body: bytes, max_parts: int = 256) -> list[tuple[str, bytes]] | str:
    """The file parts of a multipart/form-data body as (filename, bytes), or a one-line error."""
    from email.parser import BytesParser
    from email.policy import HTTP

    from edgecli.safeio import one_line

    try:
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype + b"\r\n\r\n" + body)
    except Exception as e:  # noqa: BLE001 - a malformed body is the caller's 400
        return f"not a readable multipart body ({type(e).__name__})"
    if not msg.is_multipart():
        return "not a readable multipart body (no boundary or no parts)"
    out = []
    for i, part in enumerate(msg.iter_parts()):
        if i >= max_parts:
            return f"more than {max_parts} parts in one upload; refused"
        filename = part.get_filename()
        if filename is None:
            field_name = part.get_param("name", header="content-disposition")
            return f"form field {one_line(str(field_name))[:40]!r} is not a file; upload image files only"
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            return f"{one_line(filename)[:60]}: not a readable file part"
        out.append((one_line(filename)[:200], data))
    if not out:
        return "the upload holds no files"
    return out


def _error(status: int, message: str):
    from edgecli.safeio import one_line

    return status, json.dumps({"error": one_line(message)}).encode(), _JSON


def _unauthorized():
    return 401, b'{"error": "missing or wrong API key; send Authorization: Bearer <key> or X-API-Key"}', \
        _JSON + [(b"www-authenticate", b'Bearer realm="edgecli"')]


# --------------------------------------------------------------------------- running it


def bind(host: str, port: int):
    """A listening TCP socket (port 0: a free one), or a one-line UsageError."""
    import socket

    from edgecli.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"serve: --host {host}: not an address ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def make_server(app: App, *, on_listening=None, graceful_s: float = 30.0):
    """A uvicorn server for ``app`` (uvloop and httptools when installed) that records the stopping signal.

    On SIGTERM or SIGINT uvicorn stops accepting connections, closes idle ones, lets every request in
    flight finish (the batcher keeps running until then), and only then stops the batcher; a second
    SIGINT forces the exit. uvicorn's own handler re-raises the signal at the end, which would kill the
    process before it reports; this one keeps it in ``stopped_by`` for an exit code instead.
    ``on_listening()`` is called once the app has started (model warmed up).
    """
    import importlib.util
    import signal
    import threading

    import uvicorn

    class _Server(uvicorn.Server):
        stopped_by: int | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():  # a server in a thread (tests)
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def handle_exit(self, sig, frame):
            if self.stopped_by is None:
                self.stopped_by = sig
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and on_listening is not None:
                on_listening()

    have = importlib.util.find_spec
    config = uvicorn.Config(
        app, loop="uvloop" if have("uvloop") else "asyncio", http="httptools" if have("httptools") else "h11",
        lifespan="on", access_log=False, log_level="warning", server_header=False, date_header=False,
        timeout_graceful_shutdown=graceful_s, ws="none",
        # no X-Forwarded-For rewriting: nothing here reads the client address, and uvicorn's middleware
        # parses the peer's IP (ipaddress) on every request: 3.5 us of a ~250 us request, for nothing
        proxy_headers=False)
    return _Server(config)


def run(app: App, sock, *, on_listening=None) -> int | None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT; return the signal that stopped it (None: none)."""
    server = make_server(app, on_listening=on_listening)
    server.run(sockets=[sock])
    return server.stopped_by
