"""aapo-rollout-server over a real vLLM-CPU engine: auth, bind address, malformed/oversize requests, the
client as a RolloutEngine, and generate concurrent with update-weights (one version, reported, never a mix)."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from aapo_megatron.rollout.client import RemoteRolloutEngine
from aapo_megatron.rollout.engine import RolloutError, SamplingSpec
from aapo_megatron.rollout.server import RolloutServer, build_parser, main
from aapo_megatron.rollout.weight_sync import WeightSyncError, hf_named_tensors
from tests.rollout.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
GREEDY = SamplingSpec(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def server(policy_engine):
    srv = RolloutServer(policy_engine, token=TOKEN, max_request_bytes=64 * 1024, session_timeout_s=30).start()
    yield srv
    srv.shutdown()


def raw(server, method, path, body=None, headers=None, raw_body=None):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=120)
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    payload = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, payload


def test_binds_localhost_by_default(server):
    assert server.address[0] == "127.0.0.1"
    assert build_parser().parse_args(["--model", "x"]).host == "127.0.0.1"


def test_policy_server_refuses_to_start_without_token(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("AAPO_ROLLOUT_TOKEN", raising=False)
    assert main(["--model", str(tmp_path)]) == 2
    assert "needs a bearer token" in capsys.readouterr().err


def test_update_weights_auth(server):
    body = {"action": "begin"}
    status, out = raw(server, "POST", "/update_weights", body)
    assert status == 401 and "requires 'Authorization: Bearer <token>'" in out["error"]
    status, out = raw(server, "POST", "/update_weights", body, {"Authorization": "Bearer wrong"})
    assert status == 403 and "invalid bearer token" in out["error"]
    status, out = raw(server, "POST", "/update_weights", body, {"Authorization": TOKEN})  # no "Bearer "
    assert status == 401
    with pytest.raises(WeightSyncError, match="stage 'begin' failed: .*HTTP 403: update_weights: invalid bearer token"):
        RemoteRolloutEngine(server.url, token="nope").update_weights(iter([]))


def test_generate_auth_when_configured(policy_engine):
    srv = RolloutServer(policy_engine, token=TOKEN, auth_generate=True).start()
    try:
        body = {"prompts": [[5, 6]], "sampling": {"max_tokens": 2}}
        assert raw(srv, "POST", "/generate", body)[0] == 401
        assert raw(srv, "POST", "/generate", body, {"Authorization": "Bearer x"})[0] == 403
        status, out = raw(srv, "POST", "/generate", body, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(out["completions"][0][0]["token_ids"]) == 2
    finally:
        srv.shutdown()


def test_malformed_and_wrong_requests(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ("/generate", b"{not json", 400, "malformed JSON"),
        ("/generate", b"[1, 2]", 400, "must be a JSON object"),
        ("/generate", json.dumps({"prompt": [[1]]}).encode(), 400, "unknown field(s) ['prompt']"),
        ("/generate", json.dumps({"sampling": {}}).encode(), 400, "missing field 'prompts'"),
        ("/generate", json.dumps({"prompts": [[1, "a"]]}).encode(), 400, "non-integer token id 'a'"),
        ("/generate", json.dumps({"prompts": [[1, 999]]}).encode(), 400, "token id 999 outside the vocabulary"),
        ("/generate", json.dumps({"prompts": [[]]}).encode(), 400, "prompt 0 must be a non-empty list"),
        ("/generate", json.dumps({"prompts": [[1]], "sampling": {"top_p": 0}}).encode(), 400, "top_p must be in (0, 1]"),
        ("/generate", json.dumps({"prompts": [[1]], "sampling": {"temp": 1}}).encode(), 400, "unknown sampling field(s) ['temp']"),
        ("/update_weights", json.dumps({"action": "explode"}).encode(), 400, "must be one of begin, load, commit, abort"),
        ("/update_weights", json.dumps({"action": "load", "session": "nope", "path": "/x"}).encode(), 409,
         "no active weight update session"),
    ]
    for path, body, code, msg in cases:
        status, out = raw(server, "POST", path, raw_body=body, headers=auth)
        assert status == code and msg in out["error"], (path, body, status, out)
    assert raw(server, "GET", "/nowhere")[0] == 404
    assert raw(server, "GET", "/generate")[0] == 405


def test_oversize_request_rejected(server):
    big = json.dumps({"prompts": [[1] * 40000]}).encode()
    status, out = raw(server, "POST", "/generate", raw_body=big)
    assert status == 413 and f"exceeds the limit of {64 * 1024} bytes" in out["error"]
    assert raw(server, "GET", "/health")[1]["status"] == "ok"  # still serving


def test_client_is_a_rollout_engine(server, model_dirs):
    _, models = model_dirs
    client = RemoteRolloutEngine(server.url, token=TOKEN, weight_sync_bucket_mb=0.25)
    v0 = client.weight_version
    v1 = client.update_weights(hf_named_tensors(models["b"]))
    assert v1 == v0 + 1 == client.weight_version
    assert client.last_sync.num_buckets > 2
    out = client.generate(PROMPTS, GREEDY)
    assert out.weight_version == v1
    assert [g[0].token_ids for g in out.completions] == hf_greedy(models["b"], PROMPTS, 24)
    with pytest.raises(WeightSyncError, match="stage 'finish' failed: .*HTTP 400: weight version must increase"):
        client.update_weights(hf_named_tensors(models["a"]), version=v1)
    assert client.health()["status"] == "incomplete"  # aborted mid-session: refuses until a full update
    with pytest.raises(RolloutError, match="HTTP 503: .*weights are incomplete"):
        client.generate(PROMPTS, GREEDY)
    client.update_weights(hf_named_tensors(models["a"]), version=v1 + 5)
    assert client.weight_version == v1 + 5


def test_generate_waits_for_an_open_update_and_reports_new_version(server, model_dirs):
    _, models = model_dirs
    client = RemoteRolloutEngine(server.url, token=TOKEN, weight_sync_bucket_mb=0.25)
    client.update_weights(hf_named_tensors(models["a"]))
    v = client.weight_version
    paused, go = threading.Event(), threading.Event()

    def slow_stream():
        for i, item in enumerate(hf_named_tensors(models["b"])):
            if i == 10:  # some buckets of B are already loaded
                paused.set()
                go.wait(60)
            yield item

    updater = threading.Thread(target=client.update_weights, args=(slow_stream(),))
    updater.start()
    assert paused.wait(60)
    result = {}
    gen = threading.Thread(target=lambda: result.update(out=client.generate(PROMPTS, GREEDY)))
    gen.start()
    time.sleep(1.5)
    assert gen.is_alive(), "generate must wait while an update session is open"
    assert raw(server, "GET", "/health")[1]["status"] == "updating"
    go.set()
    updater.join(60)
    gen.join(120)
    out = result["out"]
    assert out.weight_version == v + 1
    assert [g[0].token_ids for g in out.completions] == hf_greedy(models["b"], PROMPTS, 24)


def test_concurrent_generate_is_wholly_old_or_new(server, model_dirs):
    _, models = model_dirs
    client = RemoteRolloutEngine(server.url, token=TOKEN, weight_sync_bucket_mb=0.25)
    client.update_weights(hf_named_tensors(models["a"]))
    v = client.weight_version
    spec = SamplingSpec(temperature=0.0, max_tokens=96)
    expected = {v: hf_greedy(models["a"], PROMPTS, 96), v + 1: hf_greedy(models["b"], PROMPTS, 96)}
    assert expected[v] != expected[v + 1]
    results = []
    gens = [threading.Thread(target=lambda: results.append(client.generate(PROMPTS, spec))) for _ in range(3)]
    for i, g in enumerate(gens):
        g.start()
        if i == 0:
            time.sleep(0.05)
            upd = threading.Thread(target=client.update_weights, args=(hf_named_tensors(models["b"]),))
            upd.start()
    for g in gens:
        g.join(300)
    upd.join(120)
    assert len(results) == 3
    for out in results:
        assert out.weight_version in expected
        assert [g[0].token_ids for g in out.completions] == expected[out.weight_version]


def test_connect_servers_checks_role_token_and_vocabulary(server, monkeypatch):
    """What aapo-train checks before its first step with rollout.placement=server."""
    from aapo_megatron.config import RolloutConfig
    from aapo_megatron.rollout.client import connect_servers
    from tests.rollout.conftest import VOCAB

    monkeypatch.setenv("AAPO_TEST_TOKEN", TOKEN)
    cfg = RolloutConfig(placement="server", server_url=server.url, token_env="AAPO_TEST_TOKEN")
    policy, ref = connect_servers(cfg, reference=False, vocab_size=VOCAB)
    assert ref is None and policy.token == TOKEN and policy.weight_version == server.service.engine.weight_version
    assert str(policy.dtype) == "torch.float32"  # weight syncs go out in the served dtype

    with pytest.raises(RolloutError, match=r"needs rollout.reference_server_url: the URL of an aapo-rollout-server "
                                           r"started with --role reference"):
        connect_servers(cfg, reference=True)
    wrong_role = RolloutConfig(placement="server", server_url=server.url, reference_server_url=server.url,
                               token_env="AAPO_TEST_TOKEN")
    with pytest.raises(RolloutError, match=r"rollout.reference_server_url=http://127.0.0.1:\d+ serves the 'policy' "
                                           r"role, not 'reference': start that server with --role reference"):
        connect_servers(wrong_role, reference=True)
    with pytest.raises(RolloutError, match=rf"serves '.*' with a vocabulary of {VOCAB} tokens; the trained model "
                                           rf"has {VOCAB + 1}"):
        connect_servers(cfg, reference=False, vocab_size=VOCAB + 1)
    monkeypatch.delenv("AAPO_TEST_TOKEN")
    with pytest.raises(RolloutError, match=r"needs a bearer token for weight updates: set \$AAPO_TEST_TOKEN"):
        connect_servers(cfg, reference=False)
    down = RolloutConfig(placement="server", server_url="http://127.0.0.1:9", token_env="AAPO_TEST_TOKEN")
    with pytest.raises(RolloutError, match=r"rollout server http://127.0.0.1:9/version unreachable"):
        connect_servers(down, reference=False)
