"""A bounded, open-loop HTTP load generator (MLPerf "server" style: Poisson arrivals), and bench's
server scenario built on it.

``run_load(url, bodies, qps, seconds)`` sends requests at exponentially distributed gaps, whatever the
server's answers (open loop: a slow server does not slow the arrivals down), on keep-alive
connections, at most ``max_in_flight`` open at once; an arrival finding every connection busy is
counted as ``client_overflow`` and not sent, so neither side grows without bound. Latency runs from
the moment a request is written to the moment its whole answer is read; ``lag`` is how late the
client wrote it after its scheduled arrival (the client's own share, reported beside).

``server_scenario(cfg)`` starts ``edgecli serve`` on a free loopback port in a child process, drives it
at every ``bench.serve.qps`` for ``bench.serve.seconds``, and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

import numpy as np


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; parses just enough HTTP/1.1."""

    def __init__(self, on_done):
        self.on_done = on_done
        self.transport = None
        self.buf = bytearray()
        self.t_send = 0.0
        self.busy = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def send(self, data: bytes) -> None:
        self.busy = True
        self.t_send = time.perf_counter()
        self.transport.write(data)

    def data_received(self, data):
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"content-length:")
        length = 0
        if i >= 0:
            j = head.find(b"\r\n", i)
            length = int(head[i + 15: j if j > 0 else len(head)])
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        del self.buf[: end + 4 + length]
        close = b"connection: close" in head
        self.busy = False
        self.on_done(self, status, time.perf_counter() - self.t_send)
        if close:
            self.closed = True
            self.transport.close()

    def connection_lost(self, exc):
        self.closed = True
        if self.busy:
            self.busy = False
            self.on_done(self, None, 0.0)


def _requests(url: str, bodies: list[bytes], content_type: str, headers: dict | None) -> tuple[str, int, list[bytes]]:
    u = urlsplit(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    reqs = [(f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {content_type}\r\n{extra}"
             f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    return u.hostname, u.port or 80, reqs


async def _drive(url, bodies, qps, seconds, max_in_flight, seed, content_type, headers, timeout_s) -> dict:
    loop = asyncio.get_running_loop()
    host, port, reqs = _requests(url, bodies, content_type, headers)
    idle: list[_Conn] = []
    lat: list[float] = []
    lag: list[float] = []
    errors: dict[str, int] = {}
    state = {"open": 0, "in_flight": 0}
    all_done = asyncio.Event()

    def err(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    def done(conn: _Conn, status, seconds_taken: float) -> None:
        state["in_flight"] -= 1
        if status == 200:
            lat.append(seconds_taken)
        else:
            err("connection lost" if status is None else f"http {status}")
        if conn.closed or status is None:
            state["open"] -= 1
        else:
            idle.append(conn)
        if state["in_flight"] == 0:
            all_done.set()

    async def connect_and_send(data: bytes, scheduled: float) -> None:
        try:
            _, conn = await loop.create_connection(lambda: _Conn(done), host, port)
        except OSError:
            state["open"] -= 1
            state["in_flight"] -= 1
            err("connect")
            if state["in_flight"] == 0:
                all_done.set()
            return
        lag.append(time.perf_counter() - scheduled)
        conn.send(data)

    rng = np.random.default_rng(seed)
    n = max(1, int(round(qps * seconds)))
    arrivals = np.cumsum(rng.exponential(1.0 / qps, size=n))
    picks = rng.integers(0, len(reqs), size=n)
    tasks = set()
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        data = reqs[picks[i]]
        while idle and idle[-1].closed:
            idle.pop()
            state["open"] -= 1
        if idle:
            conn = idle.pop()
            state["in_flight"] += 1
            lag.append(time.perf_counter() - (t0 + arrivals[i]))
            conn.send(data)
        elif state["open"] < max_in_flight:
            state["open"] += 1
            state["in_flight"] += 1
            t = asyncio.ensure_future(connect_and_send(data, t0 + arrivals[i]))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        else:
            err("client_overflow")
    t_sent = time.perf_counter()
    if state["in_flight"]:
        all_done.clear()
        try:
            await asyncio.wait_for(all_done.wait(), timeout_s)
        except asyncio.TimeoutError:
            errors["timeout"] = errors.get("timeout", 0) + state["in_flight"]
    t_end = time.perf_counter()
    for c in idle:
        c.transport.close()
    return _summary(qps, n, lat, lag, errors, t_sent - t0, t_end - t0)


def _summary(qps, n, lat, lag, errors, send_s, total_s) -> dict:
    a = np.sort(np.asarray(lat)) * 1000.0
    g = np.asarray(lag) * 1000.0

    def pct(x, q):
        return round(float(np.percentile(x, q)), 4) if len(x) else None

    return {"offered_qps": qps, "sent": n - errors.get("client_overflow", 0), "ok": len(lat),
            "errors": sum(errors.values()), "error_kinds": dict(sorted(errors.items())),
            "achieved_qps": round(len(lat) / total_s, 1) if total_s > 0 else 0.0,
            "send_seconds": round(send_s, 3),
            "p50_ms": pct(a, 50), "p90_ms": pct(a, 90), "p99_ms": pct(a, 99), "max_ms": pct(a, 100),
            "lag_p99_ms": pct(g, 99)}


def run_load(url: str, bodies: list[bytes], qps: float, seconds: float, *, max_in_flight: int = 256,
             seed: int = 0, content_type: str = "application/json", headers: dict | None = None,
             timeout_s: float = 10.0) -> dict:
    """Offer ``qps`` Poisson arrivals for ``seconds`` to ``url`` (POST); the summary of what came back."""
    import importlib.util

    runner = asyncio.run
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        runner = uvloop.run
    return runner(_drive(url, bodies, qps, seconds, max_in_flight, seed, content_type, headers, timeout_s))


def example_bodies(card: dict, n: int = 64, seed: int = 0) -> list[bytes]:
    """``n`` request bodies of the kind the model takes (random pixels, features; fixed sentences)."""
    rng = np.random.default_rng(seed)
    pre = card.get("preprocess") or {}
    kind = card.get("kind") if pre else None
    out = []
    for i in range(n):
        if kind == "image":
            h, w, c = pre["raw_shape"]
            px = rng.integers(0, 256, size=(h, w) if c == 1 else (h, w, c))
            obj = {"id": i, "pixels": px.tolist()}
        elif kind == "table":
            obj = {"id": i, "features": rng.normal(size=pre["raw_shape"][0]).round(4).tolist()}
        elif kind == "text":
            obj = {"id": i, "text": ["turn on the lights", "what is the weather tomorrow", "play some jazz",
                                     "set an alarm for seven"][i % 4]}
        else:
            spec = card["inputs"][0]
            obj = {"id": i, "input": np.zeros([d or 1 for d in spec["shape"][1:]]).tolist()}
        out.append(json.dumps(obj).encode())
    return out


# --------------------------------------------------------------------------- bench's server scenario


def start_server(args: list[str], *, env: dict | None = None, timeout_s: float = 180.0):
    """Start ``edgecli serve ARGS --port 0`` in a child process; (process, url) once it says it is ready."""
    import os
    import re
    import subprocess
    import sys
    import threading

    from edgecli.errors import CheckFailed

    proc = subprocess.Popen([sys.executable, "-m", "edgecli", "serve", *args, "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    found: dict = {}
    lines: list[str] = []

    def watch():
        for line in proc.stderr:
            lines.append(line.rstrip())
            m = re.search(r"ready on (http://\S+)", line)
            if m and "url" not in found:
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    ready = threading.Event()
    threading.Thread(target=watch, daemon=True).start()
    ready.wait(timeout_s)
    if "url" not in found:
        proc.kill()
        proc.wait()
        raise CheckFailed("bench.serve: the server did not start: " + (lines[-1] if lines else "no output"))
    proc.lines = lines  # type: ignore[attr-defined]
    return proc, found["url"]


def stop_server(proc, timeout_s: float = 60.0) -> int:
    """SIGTERM, then the exit code (143 when it drained and stopped as it should)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def server_scenario(cfg, quiet: bool = False) -> dict:
    """bench.serve: every offered load against ``edgecli serve`` of this config on a free loopback port."""
    import urllib.request

    from edgecli.report import info

    sc = cfg.bench.serve
    args = ["-c", str(cfg.source)] + [a for o in getattr(cfg, "_overrides", ()) for a in ("--set", o)]
    headers = {}
    if cfg.serve.api_key_env:
        import os

        headers["Authorization"] = f"Bearer {os.environ.get(cfg.serve.api_key_env, '').strip()}"
    proc, url = start_server(args)
    rows = []
    try:
        req = urllib.request.Request(url + "/v1/model", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            card = json.loads(r.read())
        bodies = example_bodies(card)
        for qps in sc.qps:
            if not quiet:
                info(f"bench.serve: {qps:g} req/s for {sc.seconds:g} s against {url}")
            row = run_load(url + "/v1/predict", bodies, qps, sc.seconds, max_in_flight=sc.max_in_flight,
                           headers=headers)
            rows.append(row)
    finally:
        code = stop_server(proc)
    return {"url": url, "model_sha256": card.get("sha256") if rows else None, "seconds": sc.seconds,
            "rows": rows, "server_exit_code": code,
            "server_summary": next((ln for ln in reversed(proc.lines) if "stopped by" in ln), None)}


def scenario_table(res: dict):
    """(columns, rows) of the scenario's report table: offered, achieved, percentiles, errors."""
    return ["offered req/s", "achieved req/s", "p50 ms", "p90 ms", "p99 ms", "errors"], [
        [f"{r['offered_qps']:g}", f"{r['achieved_qps']:g}", _ms(r["p50_ms"]), _ms(r["p90_ms"]), _ms(r["p99_ms"]),
         str(r["errors"]) + (f" ({', '.join(f'{k} {v}' for k, v in r['error_kinds'].items())})" if r["errors"] else "")]
        for r in res["rows"]]


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"
