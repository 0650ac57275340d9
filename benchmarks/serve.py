"""`edgecli serve` under Poisson load on this machine, raw ASGI beside FastAPI and Starlette (issue 16; not a pytest).

For digits-cnn (trained briefly into a temp dir, then exported), each server is started in a child
process on a free loopback port and driven by edgecli's own load generator (edgecli/loadgen.py, the
one bench.serve uses) from this process: client and server share the machine's cores.

  raw ASGI   `edgecli serve` itself (edgecli/serving.py), exactly as a user starts it;
  fastapi    a minimal FastAPI app: one `POST /v1/predict` route taking the Request, over the very
             same Model, Reader, Batcher and request handling (serving.App.predict), same uvicorn
             settings (uvloop, httptools, no access log);
  starlette  the same route as a bare Starlette Route.

For each: p99 at 1,000 req/s, then the largest sustained offered load (achieved >= 0.95 x offered,
no errors, p99 < 10 ms), found by doubling from 1,000 req/s and bisecting between the last load that
held and the first that did not. One table per server (offered, achieved, p50/p90/p99, errors, the
client's own lag), then the summary: sustained QPS and p99 at 1,000 req/s per server, the raw/FastAPI
ratio, and the issue's goals (>= 5,000 req/s sustained, p99 <= 5 ms at 1,000 req/s).

    .venv/bin/python benchmarks/serve.py            # about 3 minutes
    .venv/bin/python benchmarks/serve.py --quick    # shorter steps, raw ASGI and FastAPI only (about 1.5 min)
    .venv/bin/python benchmarks/serve.py --profile raw --profile-qps 3000   # + cProfile of the server process

``--profile SERVER`` adds one run of that server under cProfile (main thread: the event loop, HTTP,
parsing, batching; the model runs in its worker thread and shows up as edgecli_model_seconds) at
``--profile-qps`` and prints the top entries by own time and by cumulative time.
"""

# no `from __future__ import annotations`: FastAPI reads the route's `request: Request` annotation at runtime

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("raw", "fastapi", "starlette")
P99_LIMIT_MS = 10.0
GOAL_QPS, GOAL_P99_AT_1000 = 5000.0, 5.0


# --------------------------------------------------------------------------- the framework servers (child process)


def _build(config: str, sets: list[str]):
    """Model, Reader, Batcher and serving.App as `edgecli serve` builds them (edgecli/stages/serve.py)."""
    from edgecli import serving
    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.inputs import reader_for
    from edgecli.predict import Model
    from edgecli.stages.serve import resolve_model

    cfg = load_config(config, sets)
    sc = cfg.serve
    path = resolve_model(cfg, ArtifactStore.for_config(cfg))
    model = Model(path, sc.threads, sc.providers, runtime=sc.runtime)
    reader = reader_for(model.info, model.inputs)
    k = min(sc.top_k, len(model.labels)) if model.labels else sc.top_k
    batcher = serving.Batcher(model, k=k, max_batch=sc.max_batch, max_wait_ms=sc.max_wait_ms,
                              queue_limit=sc.queue_limit)
    app = serving.App(model, reader, batcher, serving.Settings(sc.max_request_bytes, None, sc.allow_path))
    return app, batcher


def framework_app(kind: str, app, batcher):
    """A FastAPI or Starlette app whose one route answers through ``app.predict`` (same checks, same batcher)."""
    import contextlib

    from starlette.responses import Response

    @contextlib.asynccontextmanager
    async def lifespan(_):
        await batcher.start()
        yield
        await batcher.stop()

    async def predict(request):
        t0 = time.perf_counter()
        status, body, headers = await app.predict(request.scope, request.receive, request.method)
        app.metrics.e2e.observe(time.perf_counter() - t0)  # what the raw app records per request, too
        app.metrics.count("predict", status)
        return Response(body, status, headers={k.decode(): v.decode() for k, v in headers})

    if kind == "fastapi":
        from fastapi import FastAPI, Request

        api = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

        @api.post("/v1/predict")
        async def predict_route(request: Request):
            return await predict(request)

        return api
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])], lifespan=lifespan)


def serve_framework(kind: str, config: str, sets: list[str]) -> int:
    from edgecli import serving

    app, batcher = _build(config, sets)
    sock = serving.bind("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    server = serving.make_server(framework_app(kind, app, batcher), on_listening=lambda: print(
        f"serve: ready on http://{host}:{port} ({kind})", file=sys.stderr, flush=True))
    server.run(sockets=[sock])
    return 0


# --------------------------------------------------------------------------- the driver


def _env() -> dict:
    return {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(REPO)}


def prepare(workdir: Path, epochs: int) -> tuple[Path, list[str]]:
    """digits-cnn trained for ``epochs`` and exported, through the real CLI: (config, its --set items)."""
    sets = [f"artifacts_dir={workdir / 'artifacts'}", f"train.epochs={epochs}", "train.device=cpu"]
    cfg = REPO / "configs" / "digits-cnn.yaml"
    for stage in ("train", "export"):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "edgecli", stage, "-c", str(cfg), "-q",
                            *[a for s in sets for a in ("--set", s)]],
                           capture_output=True, text=True, env=_env(), cwd=workdir)
        if r.returncode != 0:
            sys.exit(f"benchmarks/serve.py: edgecli {stage} failed:\n{r.stderr[-2000:]}")
        print(f"[setup] edgecli {stage} (digits-cnn, train.epochs={epochs}) {time.time() - t0:.0f} s", file=sys.stderr)
    return cfg, sets


def start(kind: str, cfg: Path, sets: list[str], profile_out: Path | None = None):
    """(process, url) of one server, started in a child process on a free loopback port."""
    set_args = [a for s in sets for a in ("--set", s)]
    pre = [sys.executable] + (["-m", "cProfile", "-o", str(profile_out)] if profile_out else [])
    if kind == "raw":
        cmd = pre + ["-m", "edgecli", "serve", "-c", str(cfg), *set_args, "--port", "0"]
    else:
        cmd = pre + [str(Path(__file__).resolve()), "--_server", kind, "-c", str(cfg), *set_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    found, lines, ready = {}, [], threading.Event()

    def watch():
        for line in proc.stderr:
            lines.append(line.rstrip())
            m = re.search(r"ready on (http://\S+)", line)
            if m and "url" not in found:
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=watch, daemon=True).start()
    ready.wait(180)
    if "url" not in found:
        proc.kill()
        sys.exit(f"benchmarks/serve.py: the {kind} server did not start: " + "\n".join(lines[-20:]))
    proc.lines = lines  # type: ignore[attr-defined]
    return proc, found["url"]


def stop(proc) -> int:
    from edgecli.loadgen import stop_server

    return stop_server(proc)


def _client_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def held(row: dict) -> bool:
    return (row["errors"] == 0 and row["achieved_qps"] >= 0.95 * row["offered_qps"]
            and row["p99_ms"] is not None and row["p99_ms"] < P99_LIMIT_MS)


def measure(kind: str, cfg: Path, sets: list[str], bodies, seconds: float, bisect_steps: int, top: float) -> dict:
    """p99 at 1,000 req/s and the largest sustained load for one server."""
    from edgecli.loadgen import run_load

    proc, url = start(kind, cfg, sets)
    rows: list[dict] = []
    try:
        run_load(url + "/v1/predict", bodies, 500, 0.5)  # warm the connections and the server's first batches

        def step(qps: float) -> dict:
            c0, s0, t0 = _client_cpu(), _proc_cpu(proc.pid), time.perf_counter()
            row = run_load(url + "/v1/predict", bodies, qps, seconds, max_in_flight=256)
            wall = time.perf_counter() - t0
            # CPU of each side as % of one core over the step (2 cores: 200% is the whole machine)
            row["client_cpu_pct"] = round(100 * (_client_cpu() - c0) / wall)
            row["server_cpu_pct"] = round(100 * (_proc_cpu(proc.pid) - s0) / wall) if s0 is not None else None
            row["held"] = held(row)
            rows.append(row)
            print(f"[{kind}] {qps:7.0f} req/s offered: achieved {row['achieved_qps']:7.0f}, p99 {row['p99_ms']} ms, "
                  f"errors {row['errors']} -> {'held' if row['held'] else 'not held'}", file=sys.stderr)
            return row

        at_1000 = step(1000.0)
        lo, hi = (1000.0, None) if at_1000["held"] else (None, 1000.0)
        q = 2000.0
        while lo is not None and hi is None and q <= top:  # double until a load does not hold
            if step(q)["held"]:
                lo = q
            else:
                hi = q
            q *= 2
        q = 500.0
        while lo is None and q >= 125:  # 1,000 did not hold: halve until a load holds
            if step(q)["held"]:
                lo = q
            else:
                hi = q
            q /= 2
        for _ in range(bisect_steps if lo is not None and hi is not None else 0):
            mid = round((lo + hi) / 2 / 50) * 50
            if mid in (lo, hi):
                break
            if step(mid)["held"]:
                lo = mid
            else:
                hi = mid
        best = max((r for r in rows if r["held"]), key=lambda r: r["offered_qps"], default=None)
    finally:
        code = stop(proc)
    return {"server": kind, "url": url, "rows": sorted(rows, key=lambda r: r["offered_qps"]), "at_1000": at_1000,
            "sustained": best, "first_not_held": hi, "exit_code": code}


def profile(kind: str, cfg: Path, sets: list[str], bodies, qps: float, seconds: float, workdir: Path, top: int) -> dict:
    """One run at ``qps`` with the server process under cProfile; the stats' top entries."""
    import io
    import pstats

    from edgecli.loadgen import run_load

    out = workdir / f"profile-{kind}.prof"
    proc, url = start(kind, cfg, sets, profile_out=out)
    try:
        run_load(url + "/v1/predict", bodies, 500, 0.5)
        row = run_load(url + "/v1/predict", bodies, qps, seconds, max_in_flight=256)
        metrics = _scrape(url)
    finally:
        stop(proc)
    texts = {}
    for sort in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(str(out), stream=s).strip_dirs().sort_stats(sort).print_stats(top)
        texts[sort] = s.getvalue()
    return {"row": row, "stats": texts, "metrics": metrics, "file": str(out)}


def _scrape(url: str) -> dict:
    """Sums and counts of the server's own histograms (model time, queue wait, end to end, batch size)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for name in ("edgecli_model_seconds", "edgecli_queue_wait_seconds", "edgecli_request_seconds", "edgecli_batch_size"):
        s = re.search(rf"^{name}_sum (\S+)$", text, re.M)
        c = re.search(rf"^{name}_count (\S+)$", text, re.M)
        if s and c:
            out[name] = {"sum": float(s.group(1)), "count": float(c.group(1))}
    return out


def table(res: dict) -> str:
    head = f"{'offered':>9} {'achieved':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7} {'lag p99':>8} {'srv cpu':>8} {'cli cpu':>8}  held"
    lines = [f"== {res['server']} ==", head]
    for r in res["rows"]:
        lines.append(f"{r['offered_qps']:9.0f} {r['achieved_qps']:9.0f} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} "
                     f"{r['p99_ms']:8.3f} {r['errors']:7d} {r['lag_p99_ms']:8.3f} {_pct(r['server_cpu_pct'])} "
                     f"{_pct(r['client_cpu_pct'])}  {'yes' if r['held'] else 'no'}"
                     if r["p50_ms"] is not None else f"{r['offered_qps']:9.0f} {'-':>9} {'-':>8} {'-':>8} {'-':>8} "
                     f"{r['errors']:7d} {'-':>8}  no")
    return "\n".join(lines)


def _pct(v) -> str:
    return f"{'-' if v is None else str(v) + '%':>8}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="1.5 s steps, 2 bisection steps, raw and fastapi only")
    ap.add_argument("--servers", default=None, help=f"comma-separated subset of {','.join(SERVERS)}")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per offered load (default 3, quick 1.5)")
    ap.add_argument("--epochs", type=int, default=2, help="digits-cnn training epochs (the model's speed does not depend on it)")
    ap.add_argument("--top", type=float, default=32000.0, help="the highest offered load tried")
    ap.add_argument("--profile", choices=SERVERS, default=None, help="also profile this server (cProfile)")
    ap.add_argument("--profile-qps", type=float, default=3000.0)
    ap.add_argument("--workdir", default=None, help="keep the trained model and profile here (default: a temp dir)")
    ap.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the servers, e.g. serve.max_wait_ms=0 (repeatable)")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("--_server", choices=SERVERS[1:], help=argparse.SUPPRESS)
    ap.add_argument("-c", dest="config", help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="sets", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._server:
        return serve_framework(a._server, a.config, a.sets)

    sys.path.insert(0, str(REPO))
    from edgecli.loadgen import example_bodies

    seconds = a.seconds or (1.5 if a.quick else 3.0)
    servers = a.servers.split(",") if a.servers else (["raw", "fastapi"] if a.quick else list(SERVERS))
    bad = [s for s in servers if s not in SERVERS]
    if bad:
        ap.error(f"--servers: unknown {bad}; choose from {SERVERS}")
    t_start = time.time()
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="edgecli-serve-bench-")
    workdir = Path(a.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        cfg, sets = prepare(workdir, a.epochs)
        sets = sets + a.serve_set
        # the bodies bench.serve sends: random 8x8 pixel images as infer's JSON requests
        from edgecli.config import load_config

        c = load_config(cfg, sets)
        card_proc, url = start("raw", cfg, sets)
        import urllib.request

        with urllib.request.urlopen(url + "/v1/model", timeout=30) as r:
            card = json.loads(r.read())
        stop(card_proc)
        bodies = example_bodies(card)
        results = [measure(s, cfg, sets, bodies, seconds, 2 if a.quick else 3, a.top) for s in servers]
        prof = profile(a.profile, cfg, sets, bodies, a.profile_qps, max(seconds, 3.0), workdir, 25) if a.profile else None
    finally:
        if tmp is not None and not a.profile:
            tmp.cleanup()

    print()
    print(f"edgecli serve, digits-cnn ({c.model.arch}, export/model.onnx), serve.max_batch={c.serve.max_batch}, "
          f"max_wait_ms={c.serve.max_wait_ms:g}, threads={c.serve.threads}; loopback, client (edgecli/loadgen.py, "
          f"Poisson, {seconds:g} s per load) and server on the same {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    print("sustained = achieved >= 0.95 x offered, 0 errors, p99 < 10 ms; lag = the client's own lateness (ms);\n"
          "srv/cli cpu = CPU of the server process (all threads) / of this client process, % of one core\n")
    for res in results:
        print(table(res), "\n")
    print(f"{'server':<10} {'sustained req/s':>16} {'p99 at 1000 req/s':>18}  exit")
    for res in results:
        s = res["sustained"]
        print(f"{res['server']:<10} {s['offered_qps'] if s else 0:16.0f} {res['at_1000']['p99_ms'] or float('nan'):15.3f} ms"
              f"  {res['exit_code']}")
    by = {r["server"]: r for r in results}

    def sus(k):
        return by[k]["sustained"]["offered_qps"] if by.get(k) and by[k]["sustained"] else 0.0

    if "raw" in by and "fastapi" in by and sus("fastapi"):
        print(f"\nraw ASGI / FastAPI sustained req/s: {sus('raw') / sus('fastapi'):.2f}x; p99 at 1000 req/s: "
              f"{by['raw']['at_1000']['p99_ms']:.3f} vs {by['fastapi']['at_1000']['p99_ms']:.3f} ms")
    if "raw" in by and "starlette" in by and sus("starlette"):
        print(f"raw ASGI / Starlette sustained req/s: {sus('raw') / sus('starlette'):.2f}x")
    if "raw" in by:
        r = by["raw"]
        p = r["at_1000"]["p99_ms"]
        print(f"\ngoal sustained >= {GOAL_QPS:.0f} req/s: {sus('raw'):.0f} -> {'met' if sus('raw') >= GOAL_QPS else 'NOT met'}")
        print(f"goal p99 <= {GOAL_P99_AT_1000:g} ms at 1000 req/s: {p} ms -> "
              f"{'met' if p is not None and p <= GOAL_P99_AT_1000 and r['at_1000']['errors'] == 0 else 'NOT met'}")
    if prof:
        m = prof["metrics"]
        row = prof["row"]
        print(f"\n== profile: {a.profile} under cProfile at {a.profile_qps:g} req/s offered "
              f"(achieved {row['achieved_qps']:g}, p99 {row['p99_ms']} ms under the profiler) ==")
        for name, v in m.items():
            mean = v["sum"] / v["count"] if v["count"] else 0
            unit = "" if name == "edgecli_batch_size" else " s"
            print(f"  {name}: count {v['count']:.0f}, sum {v['sum']:.3f}{unit}, mean {mean:.6g}{unit}")
        print(prof["stats"]["tottime"])
        print(prof["stats"]["cumulative"])
        print(f"(stats file: {prof['file']})")
    print(f"\nbenchmarks/serve.py took {time.time() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "profile": prof and {k: prof[k] for k in ("row", "metrics")}},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
