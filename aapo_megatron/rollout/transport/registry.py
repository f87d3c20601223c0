"""The weight transports by name, which one `auto` picks, and what cannot work (checked at config time).

Torch- and vLLM-free, so config validation can use it. `TRANSPORTS` is the single source of the names;
`rollout.weight_transport` is one of them or "auto".

| placement                       | CPU host | GPU host |
|---------------------------------|----------|----------|
| colocated (engines in the job)  | shm      | ipc      |
| server on this host (loopback)  | shm      | nccl     |
| server on another host          | gloo     | nccl     |
"""

from __future__ import annotations

import ipaddress
from typing import Optional
from urllib.parse import urlsplit

TRANSPORTS: dict[str, str] = {
    "shm": "aapo_megatron.rollout.transport.shm:ShmTransport",
    "ipc": "aapo_megatron.rollout.transport.ipc:IpcTransport",
    "gloo": "aapo_megatron.rollout.transport.gloo:GlooTransport",
    "nccl": "aapo_megatron.rollout.transport.nccl:NcclTransport",
}
"""Transport name -> "module:class" of its trainer side (imported only when used)."""

CHOICES = ("auto", *TRANSPORTS)
"""Valid values of rollout.weight_transport."""

SAME_HOST = ("shm", "ipc")
"""Transports whose data plane is this host's memory (/dev/shm files, CUDA IPC handles)."""

KEY = "rollout.weight_transport"


def is_loopback(host: str) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: Optional[str]) -> bool:
    """Whether a server URL names this host (localhost or a loopback address); None counts as this host."""
    if not url:
        return True
    return is_loopback(urlsplit(url if "//" in url else "//" + url).hostname or "")


def resolve_transport(requested: str, *, placement: str, cuda: bool, same_host: bool = True) -> str:
    """The transport to use: `requested`, or for "auto" the one the placement needs (table in the module doc).

    placement: "colocated" (engines in this job, on the trainer's devices) or "server"; cuda: the trainer's
    weights live on CUDA; same_host: a server runs on this host. Raises ValueError naming the key for a
    combination that cannot work (`check_transport`).
    """
    if requested not in CHOICES:
        raise ValueError(f"'{KEY}' must be one of {', '.join(CHOICES)}; got {requested!r}")
    if requested == "auto":
        if placement == "colocated":
            requested = "ipc" if cuda else "shm"
        elif cuda:
            requested = "nccl"
        else:
            requested = "shm" if same_host else "gloo"
    check_transport(requested, placement=placement, same_host=same_host)
    return requested


def check_transport(name: str, *, placement: str, same_host: bool) -> None:
    """Raise ValueError naming rollout.weight_transport when `name` cannot reach the engines of `placement`."""
    if name == "nccl" and placement == "colocated":
        raise ValueError(
            f"'{KEY}': nccl cannot reach colocated engines: they share the trainer's GPUs, and NCCL refuses two "
            f"ranks of one communicator on the same GPU ('Duplicate GPU detected'); use ipc (or auto)")
    if name == "ipc" and placement != "colocated":
        raise ValueError(
            f"'{KEY}': ipc passes CUDA IPC handles, which only a process on the trainer's own GPU can open; a "
            f"rollout server (placement=server) is not one; use nccl (or auto)")
    if name in SAME_HOST and not same_host:
        raise ValueError(
            f"'{KEY}': {name} moves weights through this host's memory, but the rollout server is on another "
            f"host (rollout.server_url is not a loopback address); use gloo on CPU or nccl on GPU (or auto)")


def load_transport(name: str) -> type:
    """The trainer-side class of a transport (imports its module)."""
    import importlib

    if name not in TRANSPORTS:
        raise ValueError(f"'{KEY}': unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)}")
    module, _, cls = TRANSPORTS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
