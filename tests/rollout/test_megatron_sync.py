"""Weight sync from a real Megatron-Core GPTModel (TP=1 and TP=2 over gloo) whose weights changed: the ranks
gather HF-named tensors (aapo_megatron.models.weights.iter_hf_tensors) and rank 0 streams them in buckets to
the policy engine (through a real rollout server process); the server's greedy output must equal HF
transformers' greedy output for the same weights, token for token."""

from __future__ import annotations

import pytest
import torch

from aapo_megatron.rollout.client import RemoteRolloutEngine
from aapo_megatron.rollout.engine import SamplingSpec
from tests.distributed import run_ranks
from tests.rollout.conftest import PROMPTS, SERVER_TOKEN, hf_greedy

pytestmark = pytest.mark.slow


def _sync_from_megatron(rank: int, world_size: int, hf_dir: str, url: str, seed: int):
    from safetensors.torch import load_file

    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.distributed import init_distributed
    from aapo_megatron.models.weights import gather_hf_state_dict, iter_hf_tensors, load_hf_weights, model_naming
    from aapo_megatron.rollout.client import RemoteRolloutEngine

    init_distributed(ParallelConfig(tensor_model_parallel_size=world_size))
    spec = ArchSpec.from_hf_dir(hf_dir)
    model = build_policy(spec, dtype="float32")
    mapping = WeightMapping(spec, naming=model_naming(model))
    load_hf_weights(model, mapping, load_file(f"{hf_dir}/model.safetensors"))
    # Change the weights (same noise pattern on every rank, so replicated parameters stay identical).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    stream = iter_hf_tensors(model, mapping)
    version = None
    if rank == 0:
        engine = RemoteRolloutEngine(url, token=SERVER_TOKEN, weight_sync_bucket_mb=0.25)
        version = engine.update_weights(stream)
        stats = engine.last_sync
        assert stats.num_buckets > 2, stats
    else:
        for _ in stream:  # take part in the TP all-gathers
            pass
    state = gather_hf_state_dict(model, mapping)
    return (version, state) if rank == 0 else None


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_matches_hf_after_sync_from_megatron(tp, rollout_server, model_dirs):
    dirs, models = model_dirs
    server = RemoteRolloutEngine(rollout_server["url"], token=SERVER_TOKEN)
    v_before = server.weight_version
    version, state = run_ranks(_sync_from_megatron, tp, args=(dirs["a"], rollout_server["url"], 100 + tp),
                               env={"OMP_NUM_THREADS": "1"}, timeout_s=600)[0]
    assert version == v_before + 1

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(models["a"].config).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    expected = hf_greedy(hf, PROMPTS, 24)
    assert expected != hf_greedy(models["a"], PROMPTS, 24), "the Megatron weights must have changed"
    out = server.generate(PROMPTS, SamplingSpec(temperature=0.0, max_tokens=24))
    assert out.weight_version == version
    assert [g[0].token_ids for g in out.completions] == expected
