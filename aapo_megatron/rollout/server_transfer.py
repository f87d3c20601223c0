"""The rollout server's network weight transport: an update session whose buckets arrive through the engine's
vLLM weight-transfer engine (`gloo` on CPU hosts, vLLM's `nccl` on GPU hosts) instead of files.

A broadcast session (`begin {"transport": "gloo"}`) drives vLLM's protocol on the server's engine:
`init` joins the trainer's group (the trainer is rank 0 and serves the rendezvous at the address and port it
sends; the server's workers take ranks `rank_offset`...), `update` receives one bucket (the worker blocks in
the broadcast while the trainer sends), `commit` finishes. The gloo engine stages every bucket and refuses, at
finish, an update missing a tensor of the served checkpoint: nothing is loaded and the old weights stay
served (400). Only `commit` holds generation back (`VersionGate`); no file path ever reaches the server.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from aapo_megatron.rollout.update_session import SessionError

BROADCAST = ("gloo", "nccl")
"""Session transports that go through the engine's weight-transfer engine."""

_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"})


class BadTransfer(ValueError):
    """A malformed init/update body (answered 400)."""


def transfer_backend(cuda: bool) -> str:
    """The weight-transfer backend a server's engine is built with: vLLM's nccl on GPU, our gloo twin on CPU."""
    return "nccl" if cuda else "gloo"


def num_transfer_workers(engine: Any) -> int:
    """Workers of the engine that receive the weights: TP x PP x DP."""
    parallel = engine.vllm_config.parallel_config
    return int(parallel.world_size) * int(getattr(parallel, "data_parallel_size", 1) or 1)


def check_init(body: dict[str, Any], workers: int) -> dict[str, Any]:
    """vLLM's NCCL-style init info from an `init` body, validated; BadTransfer names the bad field."""
    address, port = body.get("master_address"), body.get("master_port")
    world, offset = body.get("world_size"), body.get("rank_offset", 1)
    try:
        ipaddress.ip_address(address)
    except (TypeError, ValueError):
        raise BadTransfer(f"init: 'master_address' must be an IP address (the trainer's, as this server reaches "
                          f"it), got {address!r}") from None
    if not _is_int(port) or not 1 <= port <= 65535:
        raise BadTransfer(f"init: 'master_port' must be a TCP port, got {port!r}")
    if not _is_int(offset) or offset < 1:
        raise BadTransfer(f"init: 'rank_offset' must be an integer >= 1, got {offset!r}")
    if not _is_int(world) or world != offset + workers:
        raise BadTransfer(f"init: 'world_size' must be rank_offset + {workers} (this server's transfer workers), "
                          f"got {world!r}")
    return {"master_address": address, "master_port": port, "world_size": world, "rank_offset": offset,
            "packed": False}


def check_update(body: dict[str, Any]) -> dict[str, list]:
    """vLLM's per-bucket update info {names, dtype_names, shapes} from an `update` body, validated."""
    names, dtypes, shapes = body.get("names"), body.get("dtype_names"), body.get("shapes")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise BadTransfer("update: 'names' must be a non-empty list of tensor names")
    if not isinstance(dtypes, list) or len(dtypes) != len(names) or not all(d in _DTYPES for d in dtypes):
        raise BadTransfer(f"update: 'dtype_names' must list one of {sorted(_DTYPES)} per name")
    if not isinstance(shapes, list) or len(shapes) != len(names) or not all(
            isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s) for s in shapes):
        raise BadTransfer("update: 'shapes' must list one shape (non-negative integers) per name")
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def begin(engine: Any, rpc_timeout_s: float) -> None:
    """Open the engine's update (after ending any left by a dead trainer: vLLM keeps a failed one active)."""
    await engine.collective_rpc("aapo_abort_weight_update", timeout=rpc_timeout_s)
    await engine.start_weight_update()


async def init(engine: Any, info: dict[str, Any]) -> None:
    """The engine's workers join the trainer's group (returns once the trainer joined too)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=info))


async def update(engine: Any, info: dict[str, list]) -> None:
    """The engine's workers receive one bucket (staged until commit)."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    await engine.update_weights(WeightTransferUpdateRequest(update_info=info))


async def abort(engine: Any, rpc_timeout_s: float) -> None:
    """End the engine's update without loading it."""
    await engine.collective_rpc("aapo_abort_weight_update", timeout=rpc_timeout_s)


async def commit(engine: Any, st: Any) -> None:
    """Load the staged update while no generate runs (`st` is the server's RolloutState). An incomplete update
    is refused by the engine (SessionError 400, old weights served); a failure while loading marks it broken."""
    await st.gate.acquire_write()
    try:
        try:
            await engine.finish_weight_update()
        except Exception as exc:  # noqa: BLE001 - the worker's error arrives as text
            try:
                await abort(engine, st.rpc_timeout_s)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            message = str(exc)
            if "update rejected, the served weights are unchanged" in message:
                raise SessionError(400, f"{_worker_message(message)}; version {st.version} still served") from None
            st.broken = "policy engine weights are incomplete: applying a weight update failed midway; send a full update"
            raise SessionError(500, f"applying the update failed: {type(exc).__name__}: {message}") from None
        st.broken = None
        await engine.reset_prefix_cache()
    finally:
        await st.gate.release_write()


def _worker_message(message: str) -> str:
    """The engine's own sentence out of vLLM's wrapped RPC error text."""
    start = message.find("the update delivered")
    end = message.find("the served weights are unchanged")
    return message[start:end + len("the served weights are unchanged")] if 0 <= start < end else message
