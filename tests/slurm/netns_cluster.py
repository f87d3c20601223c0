"""A multi-node Slurm cluster on this machine: each node a network namespace with its own hostname, address,
private /dev/shm and /etc/hosts, and its own slurmd (root only).

    cluster = NetnsSlurmCluster(nodes=2)   # node1 at 10.231.0.11, node2 at 10.231.0.12 (bridge 10.231.0.1)
    cluster.start()                        # bridge + namespaces, munged + slurmctld here, one slurmd per node
    ...                                    # sbatch / wait_job / stop as with LocalSlurmCluster
    cluster.stop()                         # daemons by pid file, then the namespaces and the bridge by name

The recipe (docs/cluster.md): a bridge in this namespace holds the controller's address; per node a veth
pair joins the bridge to the namespace's eth0. One munged serves every node (its socket is a file). Each slurmd
runs under `nsenter --net` + `unshare --uts --mount` (not `ip netns exec`, which remounts /sys and hides the
cgroup tree slurmd needs), where it sets its hostname (slurmd takes its node name from it), mounts a tmpfs on
/dev/shm and bind-mounts a hosts file naming every node, so names resolve to the nodes' addresses as on a real
cluster (gloo and the Slurm scripts use names). Only addresses inside the test's own /24 are used.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

from tests.slurm.cluster import LocalSlurmCluster, SlurmUnavailable, _terminate, apt_install, which

NET_TOOLS = ("ip", "nsenter", "unshare", "mount")


@dataclass
class NetnsSlurmCluster(LocalSlurmCluster):
    """`nodes` Slurm nodes (node1..nodeN), each in its own network namespace, on one bridge."""

    nodes: int = 2
    """Number of nodes."""
    node_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    """CPUs each node declares (the nodes share this machine's cores)."""
    subnet: str = "10.231.0"
    """The /24 the test creates: the bridge is .1, node i is .1i."""
    bridge: str = "br-aapo"
    """Name of the bridge in this namespace."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.names = [f"node{i}" for i in range(1, self.nodes + 1)]
        self.addresses = {n: f"{self.subnet}.1{i}" for i, n in enumerate(self.names, 1)}
        self.netns = {n: f"aapo-n{i}" for i, n in enumerate(self.names, 1)}
        self.veths = {n: f"aapo-v{i}" for i, n in enumerate(self.names, 1)}
        del self.pid_files["slurmd"], self.log_files["slurmd"]
        for n in self.names:
            self.pid_files[f"slurmd-{n}"] = os.path.join(self.root, "run", f"slurmd-{n}.pid")
            self.log_files[f"slurmd-{n}"] = os.path.join(self.root, "log", f"slurmd-{n}.log")
        self.hosts_file = os.path.join(self.root, "hosts")
        self._slurmd_procs: list[subprocess.Popen] = []
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name) in creation order

    # ------------------------------------------------------------------ configuration

    def controller_address(self) -> str:
        """slurmctld listens on the bridge's address, which every node reaches."""
        return f"{self.subnet}.1"

    def node_conf_lines(self) -> list[str]:
        """Per-node slurmd files (%n: the node name), one NodeName per node, one partition over them all."""
        r = self.root
        lines = [f"SlurmdSpoolDir={r}/spool/%n", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
                 f"SlurmdLogFile={r}/log/slurmd-%n.log"]
        lines += [f"NodeName={n} NodeAddr={a} CPUs={self.node_cpus} State=UNKNOWN" for n, a in self.addresses.items()]
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE "
                     "State=UP OverSubscribe=NO")
        return lines

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 90.0) -> "NetnsSlurmCluster":
        """Check root and the tools, then start as LocalSlurmCluster does (the network comes up first)."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a multi-node cluster of network namespaces needs root")
        apt_install(("iproute2",), ("ip",))
        missing = [t for t in NET_TOOLS if which(t) is None]
        if missing:
            raise SlurmUnavailable(f"{', '.join(missing)} missing (iproute2 and util-linux)")
        return super().start(timeout)

    def start_nodes(self) -> None:
        """The bridge, one namespace per node, then each node's slurmd inside it."""
        self._make_network()
        slurmd = which("slurmd")
        for n in self.names:
            os.makedirs(os.path.join(self.root, "spool", n), exist_ok=True)
            script = (f"set -e; hostname {n}; mount -t tmpfs -o size=4g tmpfs /dev/shm; "
                      f"mount --bind {self.hosts_file} /etc/hosts; exec {slurmd} -D")
            log = open(os.path.join(self.root, "log", f"slurmd-{n}.stdout"), "w")
            self._slurmd_procs.append(subprocess.Popen(
                [which("nsenter"), f"--net=/run/netns/{self.netns[n]}", which("unshare"), "--uts", "--mount",
                 "--fork", "sh", "-c", script], env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        deadline = time.monotonic() + 30
        for n, proc in zip(self.names, self._slurmd_procs):
            while self.pid(f"slurmd-{n}") is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"slurmd of {n} did not start (exit {proc.poll()})\n"
                                       f"{self.log_tail(f'slurmd-{n}')}")
                time.sleep(0.1)

    def _make_network(self) -> None:
        taken = self._ip("-o", "addr", "show", check=False).stdout
        if f" {self.subnet}." in taken:
            raise RuntimeError(f"addresses in {self.subnet}.0/24 are already in use on this machine: refusing to "
                               f"create the test network there")
        with open("/etc/hosts") as fh:
            base = fh.read()
        with open(self.hosts_file, "w") as fh:
            fh.write(base.rstrip("\n") + "\n" + "".join(f"{a} {n}\n" for n, a in self.addresses.items()))
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        self._ip("addr", "add", f"{self.controller_address()}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for n in self.names:
            ns, veth = self.netns[n], self.veths[n]
            self._ip("netns", "add", ns)
            self._made.append(("netns", ns))
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("link", "set", veth, "master", self.bridge, "up")
            self._ip("-n", ns, "addr", "add", f"{self.addresses[n]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            # A default route (nothing forwards it): tools that probe "my address" by routing to an outside
            # address (vLLM's get_ip) then find eth0's.
            self._ip("-n", ns, "route", "add", "default", "via", self.controller_address())

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([which("ip"), *args], capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`ip {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def stop(self, check: bool = True, timeout: float = 60.0) -> list[str]:
        """Stop the daemons (LocalSlurmCluster.stop), reap the node launchers, remove the namespaces and bridge."""
        leftovers = super().stop(check=False, timeout=timeout)
        for proc in self._slurmd_procs:
            if proc.poll() is None:
                _terminate(proc.pid, 10.0)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                leftovers.append(f"{proc.pid}: slurmd launcher")
        self._slurmd_procs = []
        for kind, name in reversed(self._made):
            if kind == "netns":
                self._ip("netns", "del", name, check=False)
            else:
                self._ip("link", "del", name, check=False)
        self._made = []
        if check and leftovers:
            raise RuntimeError("processes of the test Slurm cluster still running after stop: " + "; ".join(leftovers))
        return leftovers

    def node_of(self, address: str) -> Optional[str]:
        """The node name at `address`, or None."""
        return next((n for n, a in self.addresses.items() if a == address), None)
