"""The rollout backends by name: which engine generates inside the job (`rollout.backend`, placement=colocated).

Torch- and vLLM-free, so config validation can check the name. `ROLLOUT_BACKENDS` is the single source of the
names. A backend is one module with a function

    open_engines(model_path, rollout_cfg, *, reference, max_prompt_tokens, logprobs_mode)
        -> (policy RolloutEngine, reference RolloutEngine or None)

and one entry here (docs/extending.md). placement=server reaches `aapo-rollout-server`s instead, which run vLLM.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

ROLLOUT_BACKENDS: dict[str, str] = {
    "vllm": "aapo_megatron.rollout.colocated:open_engines",
}
"""Backend name -> "module:function" that opens its policy and reference engines (imported only when used)."""

KEY = "rollout.backend"


def check_backend(name: str, placement: str) -> None:
    """ValueError naming rollout.backend unless `name` is registered and can run at `placement`."""
    if name not in ROLLOUT_BACKENDS:
        close = difflib.get_close_matches(name, list(ROLLOUT_BACKENDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"'{KEY}': unknown rollout backend {name!r}{hint}; registered: "
                         f"{', '.join(sorted(ROLLOUT_BACKENDS))}")
    if placement == "server" and name != "vllm":
        raise ValueError(f"'{KEY}': {name!r} runs colocated only; rollout.placement=server reaches "
                         f"aapo-rollout-servers, which run vllm")


def backend_opener(name: str) -> Callable[..., tuple[Any, Any]]:
    """The registered `open_engines` function of backend `name` (its module imported now)."""
    module, _, attr = ROLLOUT_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
