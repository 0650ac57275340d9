"""serve: the real server on a free loopback port, a real HTTP client (httpx).

Agreement with infer on 200 digit PNGs, micro-batching seen in /metrics, bad requests answered 4xx
while the server goes on serving, 503 at the queue limit, 401 without the key, and the signals:
SIGTERM during load loses no accepted request and exits 143, SIGINT exits 130.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib.util import find_spec

import numpy as np
import pytest

from tests.conftest import REPO, Pipeline, write_config

httpx = pytest.importorskip("httpx")
# find_spec: importing uvicorn at collection would cost every xdist worker its import
pytestmark = pytest.mark.skipif(not all(find_spec(m) for m in ("uvicorn", "prometheus_client")),
                                reason="needs the serve extra (pip install -e '.[serve]')")

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pipe(trained_cnn, tmp_path_factory) -> Pipeline:
    """The session CNN exported (in-process), plus 200 test-split digits as PNG files in samples/."""
    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.stages import export

    dst = tmp_path_factory.mktemp("serve") / "pipe"
    shutil.copytree(trained_cnn.dir, dst)
    serve = {"max_wait_ms": 5, "max_batch": 32, "max_request_bytes": 65536, "api_key_env": "EDGECLI_TEST_KEY"}
    cfg = dict(trained_cnn.cfg, artifacts_dir=str(dst / "artifacts"), serve=serve)
    p = Pipeline(dst, write_config(dst / "config.yaml", cfg), cfg)
    c = load_config(p.config)
    export.run(c, ArtifactStore.for_config(c), quiet=True)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "sample_digits.py"), "-c", str(p.config),
                        "--out", str(dst / "samples"), "-n", "200"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return p


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.reader.join(10)
        return "\n".join(self.lines)


def start(p: Pipeline, *sets: str, key: bool = True) -> Served:
    """`edgecli serve --port 0` in a real child process; returns once it printed its URL."""
    env = {**os.environ, "NO_COLOR": "1"}
    if key:
        env["EDGECLI_TEST_KEY"] = KEY
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "edgecli", "serve", "-c", str(p.config), "--port", "0", *args],
                            cwd=p.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "ready on" in line:
                ready.set()
        ready.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    ready.wait(120)
    m = next((re.search(r"ready on (http://\S+)", ln) for ln in lines if "ready on" in ln), None)
    if m is None:
        proc.kill()
        raise AssertionError("server did not start:\n" + "\n".join(lines))
    s = Served(proc, m.group(1), lines)
    s.reader = t
    return s


@pytest.fixture(scope="module")
def server(pipe):
    s = start(pipe)
    yield s
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)
        s.wait()


def _pngs(p: Pipeline) -> list:
    return sorted((p.dir / "samples").glob("*.png"))


def _infer_answers(p: Pipeline, files) -> list[dict]:
    """`edgecli infer --json` on the files, in-process (the same stage the CLI runs)."""
    import contextlib
    import io

    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.stages import infer

    cfg = load_config(p.config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = infer.run(cfg, ArtifactStore.for_config(cfg), quiet=True, inputs=[str(f) for f in files],
                        json_out_stream=True)
    assert res.exit_code == 0
    return [json.loads(ln) for ln in out.getvalue().splitlines()]


def _metric(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
    return out


# --------------------------------------------------------------------------- answers


def test_200_pngs_agree_with_infer_as_uploads_and_as_json_pixels(pipe, server):
    from PIL import Image

    files = _pngs(pipe)
    assert len(files) == 200
    want = _infer_answers(pipe, files)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        uploaded = []
        for i in range(0, 200, 20):  # multipart, 20 files a request
            r = c.post("/v1/predict", files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files[i:i + 20]])
            assert r.status_code == 200, r.text
            uploaded += r.json()
        as_json = []
        for f in files:  # infer's JSON request, one object a request
            px = np.asarray(Image.open(f).convert("L")).tolist()
            r = c.post("/v1/predict", json={"id": f.name, "pixels": px})
            assert r.status_code == 200, r.text
            as_json.append(r.json())
    sha = want[0]["model_sha256"]
    for w, u, j in zip(want, uploaded, as_json, strict=True):
        assert [t["index"] for t in u["top_k"]] == [t["index"] for t in w["top_k"]]
        assert [t["index"] for t in j["top_k"]] == [t["index"] for t in w["top_k"]]
        np.testing.assert_allclose([t["prob"] for t in j["top_k"]], [t["prob"] for t in w["top_k"]], atol=2e-6)
        assert u["input"] == w["input"].rsplit("/", 1)[-1] and j["id"] == u["input"]
        assert u["model_sha256"] == j["model_sha256"] == sha and j["latency_ms"] > 0 and len(j["top_k"]) == 3
    card = httpx.get(server.url + "/v1/model", headers=AUTH).json()
    assert card["sha256"] == sha and card["path"].endswith("export/model.onnx") and card["runtime"] == "onnxruntime"


def test_a_burst_is_batched_and_each_request_gets_its_own_answer(pipe, server):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(64, 8, 8)).tolist()

    async def burst():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, limits=limits, timeout=30) as c:
            return await asyncio.gather(*[c.post("/v1/predict", json={"id": i, "pixels": im})
                                          for i, im in enumerate(imgs)])

    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 64
    assert [r.json()["id"] for r in rs] == list(range(64))
    assert max(r.json()["batch"] for r in rs) > 1
    # every answer is that image's own: the same as asking for it alone
    alone = httpx.post(server.url + "/v1/predict", json={"pixels": imgs[7]}, headers=AUTH).json()
    assert rs[7].json()["top_k"] == alone["top_k"] and alone["batch"] == 1
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    hist = _metric(text, "edgecli_batch_size")
    assert hist["edgecli_batch_size_count"] > hist['edgecli_batch_size_bucket{le="1.0"}'], "no batch > 1"
    for name in ("edgecli_request_seconds_count", "edgecli_queue_wait_seconds_count", "edgecli_model_seconds_count"):
        assert _metric(text, name)[name] > 0
    assert _metric(text, "edgecli_queue_depth")["edgecli_queue_depth"] == 0
    assert 'edgecli_requests_total{endpoint="predict",status="200"}' in text


BAD = [  # (what, kwargs of httpx.post, status, words in the error)
    ("not JSON", {"content": b"{pixels", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("NaN", {"content": b'{"pixels": [[NaN]]}', "headers": {"content-type": "application/json"}}, 400, "NaN"),
    ("wrong shape", {"json": {"pixels": [[1, 2, 3]]}}, 400, "8x8"),
    ("pixel values", {"json": {"pixels": (np.ones((8, 8)) * 300).tolist()}}, 400, "0-255"),
    ("unknown field", {"json": {"pixels": [[0] * 8] * 8, "colour": 1}}, 400, "unknown field"),
    ("path refused", {"json": {"path": "/etc/passwd"}}, 400, "refused"),
    ("bad image", {"files": [("file", ("x.png", b"\x89PNG not really", "image/png"))]}, 400, "not a readable image"),
    ("form field", {"data": {"a": "1"}, "files": [("file", ("x.png", b"x", "image/png"))]}, 400, "not a file"),
    ("oversized", {"content": b"[" + b"0," * 40000 + b"0]", "headers": {"content-type": "application/json"}}, 413,
     "max_request_bytes"),
    ("too many rows", {"json": {"pixels": [[[0] * 8] * 8] * 33}}, 413, "max_batch"),
    ("content type", {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
    ("empty list", {"json": []}, 400, "empty list"),
    ("a list item", {"json": [{"pixels": [[0] * 8] * 8}, {"pixels": "x"}]}, 400, "request[1]"),
]


def test_bad_requests_get_4xx_one_line_json_and_the_next_good_one_answers(server):
    good = {"pixels": [[0] * 8] * 8}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        for what, kw, status, words in BAD:
            r = c.post("/v1/predict", **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert words in err and "\n" not in err, (what, err)
            ok = c.post("/v1/predict", json=good)
            assert ok.status_code == 200 and ok.json()["top_k"], what
        assert c.get("/v1/predict").status_code == 405
        assert c.get("/nowhere").status_code == 404
        r = c.post("/v1/predict", json=[good, good, good])
        assert r.status_code == 200 and len(r.json()) == 3 and r.json()[0]["input"] == "request[0]"


def test_a_wrong_or_missing_api_key_gets_401_probes_need_none(server):
    good = {"pixels": [[0] * 8] * 8}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/predict", json=good, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"], headers
        assert httpx.get(server.url + "/v1/model", headers=headers).status_code == 401
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
    assert httpx.post(server.url + "/v1/predict", json=good, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_api_key_env_unset_is_a_one_line_config_error(pipe):
    from tests.conftest import edgecli

    r = edgecli("serve", "-c", str(pipe.config), "--port", "0", cwd=pipe.dir, env={"EDGECLI_TEST_KEY": ""}, timeout=120)
    assert r.returncode == 2 and "config error: serve.api_key_env" in r.stderr and "EDGECLI_TEST_KEY" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- the queue limit (in-process server)


def test_an_overfull_queue_answers_503_with_retry_after(pipe):
    """queue_limit 2, and a batch waits 2 s for company: the 3rd request of a burst finds the queue full."""
    from edgecli import serving
    from edgecli.config import load_config
    from edgecli.inputs import reader_for
    from edgecli.predict import Model

    cfg = load_config(pipe.config)
    model = Model(pipe.run_dir / "export" / "model.onnx")
    batcher = serving.Batcher(model, k=3, max_batch=64, max_wait_ms=2000, queue_limit=2)
    app = serving.App(model, reader_for(model.info, model.inputs), batcher, serving.Settings(cfg.serve.max_request_bytes))
    sock = serving.bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = serving.make_server(app)
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if srv.started:
                break
            time.sleep(0.05)

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=10)) as c:
                first = [asyncio.ensure_future(c.post("/v1/predict", json={"pixels": [[0] * 8] * 8})) for _ in range(2)]
                await asyncio.sleep(0.5)  # both queued, waiting for company
                rest = await asyncio.gather(*[c.post("/v1/predict", json={"pixels": [[0] * 8] * 8}) for _ in range(5)])
                depth = (await c.get("/metrics")).text
                return await asyncio.gather(*first), rest, depth

        first, rest, metrics = asyncio.run(burst())
        assert [r.status_code for r in rest] == [503] * 5
        assert all(r.headers["retry-after"] == "1" and "queue limit" in r.json()["error"] for r in rest)
        assert [r.status_code for r in first] == [200, 200] and first[0].json()["batch"] == 2
        assert "edgecli_queue_depth 2.0" in metrics
        assert 'edgecli_requests_total{endpoint="predict",status="503"} 5.0' in metrics
        assert batcher.accepted == 2 and batcher.refused == 5
    finally:
        srv.should_exit = True
        t.join(30)
    assert not t.is_alive()


# --------------------------------------------------------------------------- signals (real child processes)


def test_sigterm_during_load_answers_every_accepted_request_and_exits_143(pipe):
    s = start(pipe)
    results: list = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=30) as c:
            while not stop.is_set():
                img = rng.integers(0, 256, size=(8, 8)).tolist()
                try:
                    r = c.post("/v1/predict", json={"id": i, "pixels": img})
                except httpx.TransportError as e:  # refused after the listener closed: never accepted
                    with lock:
                        results.append(type(e).__name__)
                    if isinstance(e, httpx.ConnectError):
                        return
                    continue
                with lock:
                    results.append(r.status_code if r.status_code != 200 or r.json()["id"] == i else "mixed up")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while sum(1 for x in list(results) if x == 200) < 100:  # under load
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    code = s.wait(60)
    stop.set()
    for t in threads:
        t.join(30)
    err = s.stderr()
    assert code == 143, err
    m = re.search(r"stopped by SIGTERM; answered (\d+) of (\d+) accepted", err)
    assert m, err
    answered, accepted = int(m.group(1)), int(m.group(2))
    ok = results.count(200)
    assert answered == accepted == ok, (answered, accepted, ok, {x for x in results if x != 200})
    assert not [x for x in results if isinstance(x, int) and x != 200] and "mixed up" not in results
    assert "Traceback" not in err


def test_sigint_exits_130(pipe):
    s = start(pipe, "serve.api_key_env=null", key=False)
    assert httpx.get(s.url + "/readyz").status_code == 200
    assert httpx.post(s.url + "/v1/predict", json={"pixels": [[0] * 8] * 8}).status_code == 200  # no key set
    s.proc.send_signal(signal.SIGINT)
    assert s.wait(60) == 130
    err = s.stderr()
    assert "stopped by SIGINT; answered 1 of 1" in err and "Traceback" not in err


# --------------------------------------------------------------------------- bench's server scenario


def test_bench_serve_scenario_drives_the_server_and_stops_it(pipe, monkeypatch):
    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.stages import bench

    monkeypatch.setenv("EDGECLI_TEST_KEY", KEY)
    monkeypatch.chdir(pipe.dir)
    cfg = load_config(pipe.config, ["bench.models=[export]", "bench.torch_baseline=false",
                                    "bench.serve={qps: [100, 300], seconds: 1}"])
    res = bench.run(cfg, ArtifactStore.for_config(cfg), quiet=True)
    sv = json.loads((pipe.run_dir / "bench" / "results.json").read_text())["serve"]
    assert [r["offered_qps"] for r in sv["rows"]] == [100, 300]
    for r in sv["rows"]:
        assert r["errors"] == 0 and r["ok"] == r["sent"] > 0.5 * r["offered_qps"]
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["achieved_qps"] > 0
    assert sv["server_exit_code"] == 143 and sv["model_sha256"]
    assert f"answered {sum(r['ok'] for r in sv['rows'])} of" in sv["server_summary"]
    assert any(t.title.startswith("bench.serve") for t in res.tables)
