"""Where workers are, and placement by host.

A worker's HELLO says where it is (`worker_identity`): the address its peers reach it at (its
`--advertise-address`, by default this host's address on the route to the controller; its pipe,
KV and replica listeners bind it), its host (kvstream.select.host_id: network namespaces count as
hosts), its local rank when a launcher set one, and a free port for torch.distributed. The
controller then gives each worker its local rank (which GPU), puts every stage's replica holders
(`--replicas`) on other hosts, and on hosts different from each other, whenever they exist, and
takes a replacement from a standby on a host other than the failed worker's when it can.
"""
from __future__ import annotations

import os

from ..kvstream.net import WILDCARDS, listen, route_address
from ..kvstream.select import host_id

RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK")
LOCAL_RANK_ENV = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


def env_int(names) -> int | None:
    """The first of the environment variables `names` that is set, as an integer (mpirun, srun,
    torchrun set them); ValueError naming it when it is not one."""
    for k in names:
        v = os.environ.get(k)
        if v is not None and v != "":
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"{k}={v!r} is not an integer") from None
    return None


def worker_identity(controller_host: str, controller_port: int, advertise: str | None = None) -> dict:
    """A worker's HELLO fields saying where it is (messages.Hello: addr, host_id, local_rank,
    dist_port)."""
    if advertise in WILDCARDS and advertise is not None:
        raise ValueError(f"--advertise-address {advertise!r} is a wildcard: give the address peers dial")
    addr = advertise or route_address(controller_host, controller_port)
    with listen(addr) as s:  # also checks that addr is an address of this host
        dist_port = s.getsockname()[1]
    return {"addr": addr, "host_id": host_id(), "local_rank": env_int(LOCAL_RANK_ENV), "dist_port": dist_port}


def local_ranks(hosts: dict[int, str], given: dict[int, int | None]) -> dict[int, int]:
    """Each rank's local rank: the one its launcher gave, else its place among the ranks of its host."""
    out = {}
    for r in sorted(hosts):
        peers = sorted(q for q in hosts if hosts[q] == hosts[r])
        out[r] = given.get(r) if given.get(r) is not None else peers.index(r)
    return out


def free_local_rank(host: str, live: dict[int, tuple[str, int]], given: int | None = None) -> int:
    """A replacement's local rank on `host`: its launcher's, else the lowest the live ranks there
    (rank -> (host, local rank)) do not use."""
    if given is not None:
        return given
    used = {lr for h, lr in live.values() if h == host}
    return next(i for i in range(len(used) + 1) if i not in used)


def holder_ring(stage_hosts: list[str]) -> list[int]:
    """Each stage's replica holder stage: the next stage in ring order on another host, else the next."""
    return holder_rings(stage_hosts, 1)[0]


def holder_rings(stage_hosts: list[str], n: int, first: list[int] | None = None) -> list[list[int]]:
    """n holder stages per stage (rings[k][i]: stage i's k-th holder), all different and none the
    stage itself: each the next stage in ring order on a host that neither the stage nor its
    earlier holders are on, else the next one not chosen yet. `first`: the first holders, given."""
    s = len(stage_hosts)
    if not 1 <= n < s:
        raise ValueError(f"{n} replica holders per stage need at least {n + 1} stages, got {s}")
    rings: list[list[int]] = [[] for _ in range(n)]
    for i in range(s):
        chosen = [first[i]] if first is not None else []
        while len(chosen) < n:
            left = [(i + k) % s for k in range(1, s) if (i + k) % s not in chosen]
            used = {stage_hosts[i]} | {stage_hosts[j] for j in chosen}
            chosen.append(next((j for j in left if stage_hosts[j] not in used), left[0]))
        for k in range(n):
            rings[k].append(chosen[k])
    return rings


def pick_standby(standbys: list, avoid: set[str], holds=None) -> int:
    """Which standby (channel, hello) takes a failed rank: the first on a host not in `avoid` (the
    failed worker's), else the first; on equal hosts one that `holds(ch)` the rank's weights first."""
    return min(range(len(standbys)), key=lambda i: (standbys[i][1].host_id in avoid,
                                                    holds is not None and not holds(standbys[i][0]), i))
