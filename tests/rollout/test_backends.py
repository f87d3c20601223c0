"""The rollout backend registry (rollout/backends.py): names checked at config time, one entry opens a backend."""

import pytest

from aapo_megatron.config import ConfigError
from aapo_megatron.rollout import backends
from aapo_megatron.rollout.backends import ROLLOUT_BACKENDS, backend_opener, check_backend
from aapo_megatron.validation import load_config


def open_echo_engines(model_path, rollout_cfg, *, reference, max_prompt_tokens, logprobs_mode):
    """A second backend's opener, registered by the test below."""
    return ("echo", model_path), None


def test_vllm_is_the_default_backend_and_opens_the_colocated_engines():
    from aapo_megatron.rollout.colocated import open_engines

    assert load_config(None, []).rollout.backend == "vllm"
    assert backend_opener("vllm") is open_engines


def test_unknown_backend_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'rollout.backend': unknown rollout backend 'vlm' \(did you mean "
                                          r"'vllm'\?\); registered: vllm"):
        load_config(None, ["rollout.backend=vlm"])


def test_a_registered_backend_is_one_entry(monkeypatch):
    monkeypatch.setitem(ROLLOUT_BACKENDS, "echo", f"{__name__}:open_echo_engines")
    assert load_config(None, ["rollout.backend=echo"]).rollout.backend == "echo"
    assert backend_opener("echo")("/m", None, reference=False, max_prompt_tokens=8, logprobs_mode="raw_logprobs") \
        == (("echo", "/m"), None)
    with pytest.raises(ValueError, match=r"'rollout.backend': 'echo' runs colocated only"):
        check_backend("echo", "server")
    assert backends.KEY == "rollout.backend"
