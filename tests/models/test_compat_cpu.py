"""The Megatron-Core CPU shims, one test per shim, plus Megatron DDP + optimizer + grad clipping over gloo."""

from __future__ import annotations

import importlib

import pytest
import torch

from aapo_megatron.compat import megatron_cpu as shims
from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")


@pytest.fixture(autouse=True, scope="module")
def _installed():
    assert shims.install_cpu_shims() is True
    assert shims.install_cpu_shims() is True  # idempotent
    assert shims.cpu_shims_installed()


def _megatron_cuda():
    """`torch.cuda` as Megatron's parallel_state sees it (through its module-level `torch` proxy)."""
    return importlib.import_module("megatron.core.parallel_state").torch.cuda


def test_public_torch_api_is_stock_after_install():
    """The shims patch Megatron's view of torch, never torch itself: without CUDA the public API still refuses."""
    assert torch.cuda.current_device.__module__ == "torch.cuda"
    assert torch.cuda.synchronize.__module__ == "torch.cuda"
    for fn in (torch.cuda.get_rng_state, torch.cuda.set_rng_state, torch.cuda.manual_seed,
               torch.cuda.random.get_rng_state, torch.cuda.random.set_rng_state):
        assert fn.__module__ == "torch.cuda.random", fn
    assert "cuda" not in torch.Tensor.__dict__  # torch's own Tensor.cuda (inherited from TensorBase)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        torch.ones(1).cuda()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_current_device_is_cpu():
    cuda = _megatron_cuda()
    assert cuda.current_device() == "cpu"
    assert torch.zeros(2, device=cuda.current_device()).device.type == "cpu"
    assert cuda.is_available is torch.cuda.is_available  # everything else is torch.cuda's


def test_rng_state_functions_use_the_cpu_generator():
    cuda = _megatron_cuda()
    state = cuda.get_rng_state()
    a = torch.rand(5)
    cuda.set_rng_state(state)
    assert torch.equal(torch.rand(5), a)
    cuda.manual_seed(123)
    b = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(5), b)


def test_megatron_private_rng_state_functions():
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    state = random_mod._get_cuda_rng_state()
    a = torch.rand(3)
    random_mod._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_megatron_rng_tracker_forks_a_separate_stream():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(42, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    outer_before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the outer stream is restored
    torch.manual_seed(42 + 2718 + 1)  # Megatron's model-parallel seed for tp_rank 1
    assert torch.equal(torch.rand(4), inside)


def test_synchronize_is_a_noop():
    assert _megatron_cuda().synchronize() is None


def test_tensor_cuda_returns_the_cpu_tensor_only_inside_the_block():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    t = torch.ones(3)
    with shims.tensor_cuda_is_identity():
        assert t.cuda() is t and t.cuda(0) is t
    assert "cuda" not in torch.Tensor.__dict__
    assert hasattr(LanguageModule.setup_embeddings_and_output_layer, "cpu_shim_of")  # runs inside the block


def test_torch_proxy_in_every_listed_module():
    proxy = shims.torch_proxy()
    for name in shims.PROXIED_MODULES:
        assert importlib.import_module(name).torch is proxy, name
    for device in ("cuda", "cuda:1", torch.device("cuda"), 0):
        assert proxy.zeros(2, device=device).device.type == "cpu"
    assert proxy.tensor([1.0], device="cuda").device.type == "cpu"
    assert proxy.empty_like(torch.ones(2), device="cuda").device.type == "cpu"
    assert proxy.arange(3, device="cuda").tolist() == [0, 1, 2]
    assert proxy.distributed is torch.distributed and proxy.float32 is torch.float32


def test_megatron_functions_with_hardcoded_cuda_run():
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import local_multi_tensor_l2_norm

    mask = get_default_causal_mask(4)  # torch.ones(sq, sq, device="cuda") inside
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    tensors = [torch.full((3,), 2.0), torch.full((4,), 1.0)]
    norm, _ = local_multi_tensor_l2_norm(2048, torch.zeros(1, dtype=torch.int), [tensors], False)
    assert norm.device.type == "cpu" and abs(norm.item() - (12 + 4) ** 0.5) < 1e-6


def test_clip_grad_by_total_norm_cpu():
    from megatron.core.optimizer import clip_grads, optimizer

    assert clip_grads.clip_grad_by_total_norm_fp32 is shims.clip_grad_by_total_norm_fp32_cpu
    assert optimizer.clip_grad_by_total_norm_fp32 is shims.clip_grad_by_total_norm_fp32_cpu
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(params[1].grad, torch.tensor([0.0, 0.8]), atol=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=10.0, total_norm=1.0)  # below the max: unchanged
    assert torch.allclose(params[1].grad, torch.tensor([0.0, 0.8]), atol=1e-6)


def test_cpu_tensors_report_cuda_type_only_inside_the_block():
    bf16, fp32, idx = torch.zeros(2, dtype=torch.bfloat16), torch.nn.Parameter(torch.zeros(2)), torch.zeros(2, dtype=torch.long)
    with shims.cpu_tensors_report_cuda_type():
        assert bf16.type() == "torch.cuda.BFloat16Tensor" and fp32.type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
        assert idx.type() == "torch.LongTensor"  # other dtypes unchanged
        assert bf16.type(torch.float32).dtype == torch.float32  # a conversion still converts (on the CPU)
    assert bf16.type() == "torch.BFloat16Tensor" and fp32.type() == "torch.FloatTensor"
    assert "type" not in torch.Tensor.__dict__  # torch's own method is back


def test_float16_optimizer_wraps_bf16_cpu_params_with_fp32_main_params():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    assert hasattr(Float16OptimizerWithFloat16Params.__init__, "cpu_shim_of")
    weight = torch.nn.Parameter(torch.full((3,), 1.0, dtype=torch.bfloat16))
    norm = torch.nn.Parameter(torch.ones(2))  # fp32 params stay as they are
    opt = Float16OptimizerWithFloat16Params(torch.optim.SGD([weight, norm], lr=1.0), OptimizerConfig(bf16=True, lr=1.0),
                                            None, lambda *a: None)
    assert opt.float16_groups == [[weight]] and opt.fp32_from_fp32_groups == [[norm]]
    (main,) = opt.fp32_from_float16_groups[0]
    assert main.dtype == torch.float32 and weight.main_param is main
    weight.main_grad, norm.main_grad = torch.full((3,), 1e-3), torch.zeros(2)  # fp32 grads (DDP's buffer)
    opt.prepare_grads()
    opt.step_with_ready_grads()
    assert torch.allclose(main, torch.full((3,), 0.999))  # the fp32 main weight keeps a step below bf16's resolution
    assert torch.equal(weight.data, main.to(torch.bfloat16))
    assert torch.equal(weight.data, torch.ones(3, dtype=torch.bfloat16))  # 0.999 rounds back to 1.0 in bf16


def test_shims_are_version_guarded(monkeypatch):
    from aapo_megatron.errors import AapoError

    assert shims.megatron_core_version() == shims.TESTED_MEGATRON_CORE  # the venv runs the tested version
    shims.check_megatron_core_version()
    monkeypatch.setattr(shims, "megatron_core_version", lambda: "0.99.0")
    with pytest.raises(shims.MegatronVersionError, match=r"megatron-core 0\.99\.0 .*tested against megatron-core 0\.16\.1"):
        shims.check_megatron_core_version()
    monkeypatch.setattr(shims, "_INSTALLED", False)  # a fresh process: the guard runs before anything is patched
    clip_before = importlib.import_module("megatron.core.optimizer.clip_grads").clip_grad_by_total_norm_fp32
    with pytest.raises(AapoError):
        shims.install_cpu_shims()
    assert importlib.import_module("megatron.core.optimizer.clip_grads").clip_grad_by_total_norm_fp32 is clip_before


# --------------------------------------------------------------------------- optimizer step over gloo

LR, CLIP = 0.5, 1e-2


def _optimizer_body(rank: int, world_size: int):
    """Slurm env, PP=2, tied embeddings: Megatron DDP + finalize_model_grads + get_megatron_optimizer (SGD, clip_grad)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from aapo_megatron.config import ParallelConfig, ScratchModelConfig
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import attention_mask_and_position_ids, build_policy
    from aapo_megatron.models.mapping import OUTPUT_LAYER, WeightMapping
    from aapo_megatron.distributed import current_layout, init_distributed, seed_everything, teardown_distributed
    from aapo_megatron.models.weights import gather_hf_state_dict, load_hf_weights, model_naming
    from tests.models.layouts import _loss_inputs, hf_from_spec
    from tests.models.tiny_hf import padded_batch, pipeline_forward

    import os

    # Bring the job up from a Slurm-style environment (srun): rank/size/local id from SLURM_*, the master
    # from the first host of SLURM_JOB_NODELIST; the port is the harness's free port.
    slurm_env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world_size), "SLURM_LOCALID": str(rank),
                 "SLURM_JOB_NODELIST": "localhost,node[02-03]", "SLURM_JOB_ID": "77",
                 "MASTER_PORT": os.environ["MASTER_PORT"]}
    env = init_distributed(ParallelConfig(pipeline_model_parallel_size=2), environ=slurm_env)
    seed_everything(3)
    spec = ArchSpec.from_scratch(ScratchModelConfig(architecture="qwen2", hidden_size=32, num_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=48,
                                                    vocab_size=64, max_position_embeddings=32, tie_word_embeddings=True))
    policy = build_policy(spec, dtype="float32")  # tied + PP=2: exercises the Tensor.cuda shim
    mapping = WeightMapping(spec, naming=model_naming(policy))
    hf = hf_from_spec(spec)
    load_hf_weights(policy, mapping, hf.state_dict())

    config = policy.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), policy)
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=LR, sgd_momentum=0.0, weight_decay=0.0, clip_grad=CLIP), [ddp])
    ddp.zero_grad_buffer()
    opt.zero_grad()

    ids, pad = padded_batch(spec.vocab_size)
    attn_mask, pos = attention_mask_and_position_ids(pad)
    labels, loss_mask = _loss_inputs(ids, pad)

    def loss_fn(logits):
        return (vocab_parallel_cross_entropy(logits.float(), labels) * loss_mask).sum() / loss_mask.sum()

    pipeline_forward(ddp, ids, pos, attn_mask, loss_fn=loss_fn, forward_only=False)
    ok, grad_norm, _ = opt.step()
    after = gather_hf_state_dict(ddp, mapping)
    out = {"ok": ok, "grad_norm": grad_norm, "layout": current_layout(), "env": env}
    if current_layout().is_last_stage:
        out["output_copy"] = dict(policy.named_parameters())[OUTPUT_LAYER].detach().clone()
    teardown_distributed()

    if rank == 0:
        logits = hf(input_ids=ids, attention_mask=pad, position_ids=pos).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               reduction="none")
        ((ce.view_as(loss_mask) * loss_mask).sum() / loss_mask.sum()).backward()
        named = {n: p for n, p in hf.named_parameters()}  # tied: lm_head shares embed_tokens
        hf_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in named.values())).item()
        coef = CLIP / (hf_norm + 1e-6)
        expected = {n: (p.detach() - LR * coef * p.grad) for n, p in named.items()}
        out["hf_norm"] = hf_norm
        out["update_diff"] = max((after[n] - expected[n]).abs().max().item() for n in after)
        out["update_scale"] = max((LR * coef * p.grad).abs().max().item() for p in named.values())
        out["expected_embedding"] = expected["model.embed_tokens.weight"]
    return out


@pytest.mark.slow
def test_megatron_ddp_optimizer_step_with_clipping_pp2_tied():
    r0, r1 = run_ranks(_optimizer_body, world_size=2, env={"OMP_NUM_THREADS": "1"})
    assert [r["env"].launcher for r in (r0, r1)] == ["slurm", "slurm"]
    assert [(r["env"].rank, r["env"].master_addr) for r in (r0, r1)] == [(0, "localhost"), (1, "localhost")]
    assert [r["layout"].pp_rank for r in (r0, r1)] == [0, 1]
    assert r0["ok"] and r1["ok"]
    assert abs(r0["grad_norm"] - r1["grad_norm"]) < 1e-9
    assert r0["hf_norm"] > 10 * CLIP  # clipping is active
    assert abs(r0["grad_norm"] - r0["hf_norm"]) < 1e-5 * r0["hf_norm"], (r0["grad_norm"], r0["hf_norm"])
    # The clipped SGD update equals HF's gradient scaled by CLIP / norm, on every weight ...
    assert r0["update_scale"] > 1e-4
    assert r0["update_diff"] < 1e-6, r0["update_diff"]
    # ... and the last stage's copy of the tied embedding moved identically (embedding grads all-reduced).
    assert (r1["output_copy"] - r0["expected_embedding"]).abs().max().item() < 1e-6
