"""What vLLM prints: errors only by default, everything one environment variable away.

    env = engine_quiet_env()        # around LLM(...): read by the engine's processes when they start
    quiet_vllm_logger()             # this process's `vllm` logger (vLLM may be imported already)

vLLM's engine processes log warnings that tell a user of this project nothing, some of them on every step:

- "RotaryEmbedding: Failed to load weights" on every weight sync: vLLM's layer-wise reload finds no weights
  for the rotary embedding (its cos/sin cache is a buffer no checkpoint holds) and puts the cache back as it was;
- "sleep mode is not supported on CPU, ignore it." around every train phase (the time-sharing order calls
  sleep and wake_up, which are no-ops on CPU);
- about 30 lines at every engine start: chunked prefill disabled and eager mode (both asked for), no Triton CPU
  backend, no tcmalloc / iomp in LD_PRELOAD, a failed chat-template warm-up with its traceback (the engine is
  built without a tokenizer on purpose), "Using None for EOS token id", the weight-loading progress bar, a
  FutureWarning from vLLM's Triton dispatcher and a NUMA-binding note from torch's C++ code.

So an engine starts with vLLM's loggers at ERROR (`VLLM_LOGGING_LEVEL`), torch's C++ log at ERROR
(`TORCH_CPP_LOG_LEVEL`, the engine's processes only), that one FutureWarning ignored and no loading bar.
Values the user set win: `VLLM_LOGGING_LEVEL=INFO` shows all of vLLM's output again. Errors always show.
The page of "nanobind: leaked ..." lines that each engine process printed at exit is handled where it comes
from, the quick exit of `vllm_plugin`.
"""

from __future__ import annotations

import logging
import os

QUIET_LEVEL = "ERROR"
"""vLLM's log level for our engines unless VLLM_LOGGING_LEVEL is set."""
_DISPATCHER_WARNING = "ignore::FutureWarning:vllm.triton_utils.dispatcher"  # torch.distributed.reduce_op


def engine_log_level() -> str:
    """vLLM's log level for engines: VLLM_LOGGING_LEVEL when set, else QUIET_LEVEL (upper case)."""
    return (os.environ.get("VLLM_LOGGING_LEVEL") or QUIET_LEVEL).upper()


def engine_quiet_env() -> dict[str, str]:
    """Environment variables to set while an engine's processes start (the user's own values kept)."""
    warnings = os.environ.get("PYTHONWARNINGS")
    return {
        "VLLM_LOGGING_LEVEL": engine_log_level(),
        "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL") or "ERROR",
        "PYTHONWARNINGS": f"{warnings},{_DISPATCHER_WARNING}" if warnings else _DISPATCHER_WARNING,
    }


def quiet_vllm_logger() -> None:
    """Set this process's `vllm` logger to engine_log_level() (its loggers inherit it)."""
    logging.getLogger("vllm").setLevel(engine_log_level())
