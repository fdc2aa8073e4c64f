"""Local server ports: drawn outside the kernel's ephemeral range and the SLURM rendezvous range,
never one something listens on, independent of the training's seeded ``random``."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from ltscale.dist import ports
from ltscale.dist.runtime import SLURM_PORT_RANGE, slurm_port


def test_candidates_leave_out_the_ephemeral_and_slurm_ranges() -> None:
    assert ports.candidate_ports((32768, 60999)) == [range(10000, 20000), range(61000, 65536)]
    # Overlapping the SLURM range from below, and a range that ends at the top.
    assert ports.candidate_ports((15000, 25000)) == [range(10000, 15000), range(40000, 65536)]
    assert ports.candidate_ports((45000, 65535)) == [range(10000, 20000), range(40000, 45000)]
    assert ports.candidate_ports((1024, 65535)) == []  # nothing is left outside
    # A SLURM job's rendezvous port is never a candidate.
    for job in (1, 4242, 999_999):
        for step in (0, 1, 2):
            assert slurm_port(job, step) in SLURM_PORT_RANGE
    assert SLURM_PORT_RANGE == range(20000, 40000)


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path: Path) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert ports.ephemeral_range(setting) == (40000, 50000)
    setting.write_text("garbage\n")
    assert ports.ephemeral_range(setting) == (32768, 60999)
    assert ports.ephemeral_range(tmp_path / "absent") == (32768, 60999)


def test_free_ports_are_outside_both_ranges_and_bindable() -> None:
    low, high = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert not low <= port <= high and port not in SLURM_PORT_RANGE and port >= 10000
        with socket.socket() as server:  # a server can take it
            server.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = ports.candidate_ports(ports.ephemeral_range())
    assert candidates, "this machine's ephemeral range leaves no candidates"
    # Occupy a candidate port (the first one free whose successor is free too); draw it twice, then its successor.
    first = candidates[0]
    busy = next(p for p in first[:-1] if ports._bindable("127.0.0.1", p) and ports._bindable("127.0.0.1", p + 1))
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", busy))
        occupant.listen()
        draws = iter([busy - first.start, busy - first.start, busy + 1 - first.start])
        monkeypatch.setattr(ports._draw, "randrange", lambda total: next(draws))
        assert ports.free_port() == busy + 1


def test_no_room_falls_back_to_the_kernels_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = ports.free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
    # Every draw taken: also the kernel's choice, after the stated number of attempts.
    calls = []
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (32768, 60999))
    monkeypatch.setattr(ports, "_bindable", lambda host, port: calls.append(port) or False)
    assert isinstance(ports.free_port(attempts=5), int) and len(calls) == 5


def test_the_draw_ignores_the_seeded_global_random() -> None:
    # Ranks (and seeds trained side by side) seed `random` alike; their ports must still differ.
    state = random.getstate()
    random.seed(0)
    first = [ports.free_port() for _ in range(3)]
    random.seed(0)
    second = [ports.free_port() for _ in range(3)]
    assert first != second
    random.setstate(state)
