"""A TCP port for a server this process is about to start on the local machine (a rendezvous store,
an MLflow server).

``bind(0)`` answers a port that is free only while the probe holds it: the kernel hands the same
ephemeral ports to every outgoing connection and to other ``bind(0)`` calls, so a server started on
it a few seconds later (the time a spawned rank takes to import torch) can find it taken, and a
health check can reach another program's server there. Ports outside the ephemeral range are never
given out implicitly; drawn at random from those, two programs picking at the same time collide
about once in ten thousand draws, and a port something already listens on is skipped.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from ltscale.dist.runtime import SLURM_PORT_RANGE

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Linux's default ephemeral range, where the file cannot be read (another OS, a sandbox).
_DEFAULT_EPHEMERAL = (32768, 60999)
# Below this are the ports services habitually take (5000, 5432, 8080, 8888, ...).
_LOWEST = 10000
# The draw must not follow the training's seeded `random`: ranks and seeds-in-parallel processes
# seeded alike would all pick the same port.
_draw = random.SystemRandom()


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range, inclusive."""
    try:
        low, high = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def candidate_ports(ephemeral: tuple[int, int]) -> list[range]:
    """Ports from ``_LOWEST`` up that are neither ephemeral nor in the range SLURM job steps derive
    their rendezvous port from (a test cluster's or a real job's on the same node)."""
    excluded = sorted([ephemeral, (SLURM_PORT_RANGE.start, SLURM_PORT_RANGE.stop - 1)])
    ranges, start = [], _LOWEST
    for low, high in excluded:
        if low > start:
            ranges.append(range(start, low))
        start = max(start, high + 1)
    if start <= 65535:
        ranges.append(range(start, 65536))
    return [r for r in ranges if len(r)]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", attempts: int = 64) -> int:
    """A port on ``host`` that nothing is bound to now, drawn outside the ephemeral range; the
    kernel's own choice (``bind(0)``) where that leaves no room or every draw was taken."""
    ranges = candidate_ports(ephemeral_range())
    total = sum(len(r) for r in ranges)
    for _ in range(attempts if total else 0):
        index = _draw.randrange(total)
        for r in ranges:
            if index < len(r):
                port = r[index]
                break
            index -= len(r)
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
