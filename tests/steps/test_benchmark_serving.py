"""benchmarks/serving.py: errors under load are counted (a real HTTP server on 127.0.0.1 that
fails some requests), and the whole benchmark runs on the tiny Llama through the stock MLflow
scoring server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.workloads import load_benchmark

bench = load_benchmark("serving")


@pytest.fixture
def flaky_server():
    """Answers every third request with HTTP 500 and every fifth with another text."""
    seen = {"n": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                seen["n"] += 1
                n = seen["n"]
            if n % 3 == 0:
                self.send_response(500)
                self.end_headers()
                return
            text = "other" if n % 5 == 0 else "expected"
            body = json.dumps({"choices": [{"text": text}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.unit
def test_failed_and_different_answers_count_as_errors_under_load(flaky_server):
    load = bench.under_load(flaky_server, clients=4, requests=5, tokens=8, expected="expected")
    # 20 requests: 6 answered 500 (n = 3, 6, ..., 18), 3 more with another text (n = 5, 10, 20)
    assert len(load["errors"]) == 9
    assert sum("HTTPError" in e for e in load["errors"]) == 6
    assert load["requests_per_s"] > 0


@pytest.mark.integration
def test_the_benchmark_serves_the_tiny_model_and_ends_with_the_checks_line(tiny_model_dir, capsys):
    assert bench.main(["--model", str(tiny_model_dir), "--requests", "2", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "scoring server: 2 requests one after another" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "serving"
    assert [c["name"] for c in result["checks"]] == list(bench.GOALS)
    errors = [c for c in result["checks"] if c["name"].startswith("errors_at_")]
    assert [c["ratio"] for c in errors] == [0, 0, 0]  # the tiny model served greedily, 0 errors
