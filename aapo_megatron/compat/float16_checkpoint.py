"""Megatron-Core's Float16OptimizerWithFloat16Params checkpoints for models that keep some params in fp32.

Megatron numbers the optimizer state of a bf16 model by its bf16 params alone; the local spec's torch norms stay
fp32, so a bf16 checkpoint failed to save ("Param id N does not match any model sharded param") and then to load.
`install_float16_checkpoint_shim` (run by `compat.megatron_cpu.install_cpu_shims`) replaces the two methods.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional


def optimizer_order_params(opt: Any) -> list:
    """The model parameters of a Float16OptimizerWithFloat16Params in its inner optimizer's order (the order of
    the state dict's param ids): each group holds the fp32 main copies of the bf16 params and the fp32 params
    themselves, interleaved as the model lists them."""
    params = []
    for g, group in enumerate(opt.optimizer.param_groups):
        low_precision = iter(opt.float16_groups[g])
        fp32 = {id(p) for p in opt.fp32_from_fp32_groups[g]}
        params += [p if id(p) in fp32 else next(low_precision) for p in group["params"]]
    return params


def _float16_sharded_state_dict(self: Any, model_sharded_state_dict: Any, is_loading: bool = False,
                                metadata: Optional[dict] = None) -> dict:
    """Float16OptimizerWithFloat16Params.sharded_state_dict for models that also hold fp32 params.

    Megatron's numbers the optimizer state by `float16_groups` alone, which holds the bf16 params only: with any
    fp32 param (the local spec's torch norms stay fp32) the ids no longer line up and saving fails with "Param id
    N does not match any model sharded param". Here the ids follow the inner optimizer's own order.
    """
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state_dict = self.state_dict()
    order = optimizer_order_params(self)
    by_id = get_param_id_to_sharded_param_map(model_sharded_state_dict, order)
    position = {id(p): i for i, p in enumerate(order)}
    # Keyed by group: in a list, a group with no bf16 params (all norms) is an empty entry that dist_checkpointing
    # keeps in the common state while the next group's tensors move up one index, and loading fails to merge.
    state_dict["fp32_from_fp16_params"] = {
        g: [make_sharded_optimizer_tensor(by_id[position[id(param)]], main, prefix="optimizer.state.fp32_param")
            for param, main in zip(model_group, main_group)]
        for g, (model_group, main_group) in enumerate(zip(self.float16_groups, state_dict["fp32_from_fp16_params"]))
    }
    step = self._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], by_id, exclude_keys="step")  # step: one shared value
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def install_float16_checkpoint_shim() -> None:
    """Float16OptimizerWithFloat16Params' sharded_state_dict / load_state_dict for models with fp32 params too."""
    cls = importlib.import_module("megatron.core.optimizer.optimizer").Float16OptimizerWithFloat16Params
    if not hasattr(cls.sharded_state_dict, "cpu_shim_of"):
        _float16_sharded_state_dict.cpu_shim_of = cls.sharded_state_dict
        cls.sharded_state_dict = _float16_sharded_state_dict
        cls.load_state_dict = _float16_load_state_dict(cls.load_state_dict)


def _float16_load_state_dict(load: Callable) -> Callable:
    """Megatron's load_state_dict, taking the per-group dict of main params _float16_sharded_state_dict writes."""
    @functools.wraps(load)
    def load_state_dict(self: Any, state_dict: dict) -> Any:
        mains = state_dict.get("fp32_from_fp16_params")
        if isinstance(mains, dict):
            state_dict = {**state_dict, "fp32_from_fp16_params": [mains[g] for g in range(len(mains))]}
        return load(self, state_dict)

    load_state_dict.cpu_shim_of = load
    return load_state_dict
