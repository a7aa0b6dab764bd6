"""lrem serve as operations run it: reloads whose client gives up, SIGTERM with a request in flight,
an API key read from a secret file, and a query log or cache file that cannot be written.

Real servers (uvicorn in a thread, or `lrem serve` in a process) around the tiny random model;
clients are httpx and raw sockets over loopback.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from lrem.index import ItemIndex
from lrem.search import Searcher
from lrem.serve import ServeConfig, background_server, create_app
from lrem.serve_log import QueryLog

TITLES = ["corkscrew", "teapot", "coffee", "mug", "spatula", "wine glass", "sofa", "floor lamp", "rug", "kettle"]


def metric(text: str, line_start: str) -> float:
    """The value of the Prometheus sample whose line starts with `line_start` (0.0 when absent)."""
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start + " ")]
    return found[0] if found else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def folder(tiny, tmp_path):
    """An index folder of the tiny model's."""
    ItemIndex.build(tiny, {f"i{j}": t for j, t in enumerate(TITLES)}, show_progress=False).save(tmp_path / "idx")
    return tmp_path / "idx"


def test_a_reload_whose_client_leaves_is_carried_out(tiny, folder):
    """`curl -m 2 -X POST .../admin/reload` on an index that takes longer to read: the client gives
    up, but the reload it asked for still swaps the index in (it was read, then dropped)."""
    n = 50_000  # ~0.5 s to read: longer than the client stays
    emb = np.random.default_rng(0).standard_normal((n, tiny.dim), dtype=np.float32)
    big = ItemIndex.from_embeddings(emb / np.linalg.norm(emb, axis=1, keepdims=True), [f"n{j}" for j in range(n)],
                                    [f"item {j}" for j in range(n)])
    searcher = Searcher.load(folder, model=tiny)
    with background_server(create_app(searcher, ServeConfig())) as base:
        big.save(folder)
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /admin/reload HTTP/1.1\r\nHost: lrem\r\nContent-Length: 0\r\n\r\n")
        deadline = time.monotonic() + 60
        while httpx.get(base + "/info", timeout=60).json()["items"] != n and time.monotonic() < deadline:
            time.sleep(0.1)
        text = httpx.get(base + "/metrics", timeout=60).text
        assert metric(text, 'lrem_http_requests_total{path="/admin/reload",status="499"}') == 1  # it did leave first
        assert httpx.get(base + "/info", timeout=60).json()["items"] == n
        r = httpx.post(base + "/search", json={"query": "a mug", "k": 3, "mode": "direct"}, timeout=60)
        assert all(it["item_id"].startswith("n") for it in r.json()["items"]), r.text


def test_sigterm_drains_the_request_in_flight_and_exits_0(folder, tmp_path):
    """`docker stop` / Kubernetes / systemd send SIGTERM: a request under way is answered, the
    cache file is written, and the process exits 0 as after Ctrl-C (not 143, killed by the signal
    uvicorn raises again after its clean shutdown)."""
    cache, port = tmp_path / "cache.npz", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lrem.cli", "serve", "--index", str(folder), "--port", str(port),
                             "--set", f"cache_path={cache}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                httpx.get(base + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "lrem serve did not come up in 120 s"
                time.sleep(0.3)
        assert httpx.post(base + "/search", json={"query": "a mug", "mode": "direct"}, timeout=60).status_code == 200
        body = json.dumps({"query": "a teapot", "k": 2, "mode": "reason"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as held:  # in flight: its body still coming
            held.sendall(b"POST /search HTTP/1.1\r\nHost: lrem\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # waiting for it
            held.sendall(body[5:])
            held.settimeout(60)
            answer = held.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert cache.is_file() and "Traceback" not in out


@pytest.mark.parametrize("key", ["k3y\n", "  k3y  "])
def test_an_api_key_with_whitespace_around_it_is_the_key(tiny, folder, key):
    """A key from a file (a Kubernetes secret made --from-file, `LREM_API_KEY=$(cat f)` aside)
    often ends in a newline no client can send in a header: it is the key without it."""
    searcher = Searcher.load(folder, model=tiny)
    with background_server(create_app(searcher, ServeConfig(api_key=key))) as base:
        for sent, status in (("Bearer k3y", 200), ("Bearer wrong", 401), (None, 401)):
            headers = {"Authorization": sent} if sent else {}
            assert httpx.get(base + "/info", headers=headers, timeout=60).status_code == status, sent
        assert httpx.get(base + "/health", timeout=60).status_code == 200  # open, key or not


def test_a_blank_api_key_is_refused_not_taken_for_none(folder):
    """LREM_API_KEY set to whitespace (an empty secret with its newline) is refused before the
    model loads, in one line: as no key it would open the server, as a key it matches nothing."""
    with pytest.raises(ValueError, match="api_key is blank"):
        ServeConfig(api_key=" \n").key()
    r = subprocess.run([sys.executable, "-m", "lrem.cli", "serve", "--index", str(folder), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "LREM_API_KEY": "\n"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "LREM_API_KEY is blank" in r.stderr and "Traceback" not in r.stderr and "serving" not in r.stderr


def test_a_query_log_that_cannot_be_written_warns_once_and_counts(tmp_path, caplog, capfd):
    """The log's folder removed under the server (or its disk full): one warning, then a count of
    the rows lost at stop, not logging's traceback on stderr for every row."""
    log = QueryLog(tmp_path / "logs" / "q.jsonl")
    shutil.rmtree(tmp_path / "logs")
    result = {"mode_used": "direct", "cached": False, "cot": "", "items": [], "timings_ms": {"total": 1.0}}
    with caplog.at_level(logging.WARNING, logger="lrem"):
        log.start()
        for n in range(5):
            log.write({"query": f"a mug {n}"}, result)
        log.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "lrem"]
    assert len(said) == 2 and "cannot write (FileNotFoundError" in said[0], said
    assert said[1].endswith("5 rows could not be written")
    assert "Logging error" not in capfd.readouterr().err


def test_query_log_rotation_settings_that_would_never_rotate_are_refused():
    """RotatingFileHandler never rotates with 0 backups or 0 bytes: the log would grow without
    bound (and with 0 backups reopen the file on every row past the size)."""
    with pytest.raises(ValueError, match="query_log_backups=0; must be >= 1"):
        ServeConfig(query_log_backups=0)
    with pytest.raises(ValueError, match="query_log_max_mb=0; must be > 0"):
        ServeConfig(query_log_max_mb=0)


def test_a_cache_that_cannot_be_saved_at_shutdown_is_one_warning(tiny, folder, tmp_path, caplog):
    """cache_path whose folder cannot be made at shutdown (a file is in the way): one warning
    naming it, not uvicorn's "Application shutdown failed" traceback; the query log is still written."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    cfg = ServeConfig(cache_path=str(tmp_path / "blocker" / "cache.npz"), query_log=str(tmp_path / "q.jsonl"))
    searcher = Searcher.load(folder, model=tiny)
    with caplog.at_level(logging.WARNING):
        with background_server(create_app(searcher, cfg)) as base:
            assert httpx.post(base + "/search", json={"query": "a mug", "mode": "direct"}, timeout=60).status_code == 200
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(m.startswith(f"cache {cfg.cache_path}: not saved") for m in said), said
    assert not any("shutdown failed" in m for m in said), said
    assert json.loads((tmp_path / "q.jsonl").read_text())["query"] == "a mug"
