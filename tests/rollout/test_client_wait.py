"""The trainer's client waits for a rollout server that is still starting ($AAPO_ROLLOUT_WAIT_S), and no longer."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aapo_megatron.rollout.client import RemoteRolloutEngine, ServerUnreachable, _server_info, server_wait_s
from aapo_megatron.rollout.engine import RolloutError
from tests.distributed import free_port


class _Version(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"role": "policy", "weight_version": 0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_wait_setting_is_checked(monkeypatch):
    monkeypatch.delenv("AAPO_ROLLOUT_WAIT_S", raising=False)
    assert server_wait_s() == 0.0
    monkeypatch.setenv("AAPO_ROLLOUT_WAIT_S", "90")
    assert server_wait_s() == 90.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("AAPO_ROLLOUT_WAIT_S", bad)
        with pytest.raises(RolloutError, match=rf"\$AAPO_ROLLOUT_WAIT_S must be a number of seconds >= 0, got '{bad}'"):
            server_wait_s()


def test_a_server_that_comes_up_during_the_wait_is_reached():
    port = free_port()
    client = RemoteRolloutEngine(f"http://127.0.0.1:{port}", token="t")
    with pytest.raises(ServerUnreachable, match="unreachable"):
        _server_info(client, 0.0)  # no wait: the first refusal is the answer
    servers = []

    def start():  # binds only now: until then every connection is refused
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), _Version))
        threading.Thread(target=servers[0].serve_forever, daemon=True).start()

    starter = threading.Timer(1.5, start)
    starter.start()
    try:
        assert _server_info(client, 60.0)["role"] == "policy"
    finally:
        starter.cancel()
        starter.join()
        for server in servers:
            server.shutdown()
            server.server_close()


def test_the_wait_ends_naming_the_setting():
    client = RemoteRolloutEngine(f"http://127.0.0.1:{free_port()}", token="t")
    with pytest.raises(ServerUnreachable, match=r"/version unreachable: .*\(waited 2 s, \$AAPO_ROLLOUT_WAIT_S\)"):
        _server_info(client, 2.0)
