"""Which process this is in a multi-process run, and the process group that joins them.

A pipeline runs as one process per GPU. It learns its place from the launcher's environment:

- ``torchrun`` (and anything that sets the same variables, ``launch/submit.py`` included):
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- a SLURM job step started by ``srun`` with several tasks: ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the rendezvous host is the step's first node and
  the port is derived from the job and step ids, so every task of a step computes the same address
  without talking, and two steps of one job running at once on a node (a seed each) do not meet.

Without either, the run is a single process and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A job id maps into this port range, so two multi-task jobs sharing a node rarely collide; an
# explicit MASTER_PORT always wins.
_PORT_BASE, _PORT_SPAN = 20000, 20000
SLURM_PORT_RANGE = range(_PORT_BASE, _PORT_BASE + _PORT_SPAN)
# Each step of a job moves its port by this much: steps run at once share the job id, and on one
# node the same port made one step fail with EADDRINUSE and another join the wrong store. A stride
# rather than +1, so that step 1 of job N is not step 0 of job N+1 (job ids run consecutively).
_STEP_PORT_STRIDE = 7919


def slurm_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of a SLURM job step, in ``[_PORT_BASE, _PORT_BASE + _PORT_SPAN)``."""
    return _PORT_BASE + (job_id + step_id * _STEP_PORT_STRIDE) % _PORT_SPAN


class DistributedEnvError(RuntimeError):
    """The launcher's environment describes an impossible or incomplete process layout."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single, torchrun or slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a SLURM allocation or a container's share), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match or not nodelist:
        raise DistributedEnvError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is kept: it is part of the name
    return prefix + first


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except KeyError:
        raise DistributedEnvError(f"environment variable {key} is not set") from None
    except ValueError:
        raise DistributedEnvError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place, read from a torchrun or SLURM environment (single process otherwise)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ or "RANK" in environ:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in environ]
        if missing:
            raise DistributedEnvError(f"{' and '.join(missing)} not set while "
                                      f"{'RANK' if 'RANK' in environ else 'WORLD_SIZE'} is: set both (torchrun does)")
        env = DistEnv(
            rank=_int(environ, "RANK"), world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500, source="torchrun",
        )
    elif int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
        # Only an srun step with several tasks: the batch script itself (one process) also sees
        # SLURM_NTASKS > 1 and must not wait for peers that will never come.
        job = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
        step = _int(environ, "SLURM_STEP_ID") if "SLURM_STEP_ID" in environ else 0
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        env = DistEnv(
            rank=_int(environ, "SLURM_PROCID"), world_size=_int(environ, "SLURM_STEP_NUM_TASKS"),
            local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            master_addr=environ.get("MASTER_ADDR") or first_host(nodes),
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else slurm_port(job, step),
            source="slurm",
        )
    else:
        return DistEnv()
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise DistributedEnvError(f"rank {env.rank} is outside world size {env.world_size} ({env.source} environment)")
    if env.local_rank < 0:
        raise DistributedEnvError(f"local rank {env.local_rank} is negative ({env.source} environment)")
    return env


def device_for(env: DistEnv, requested: str) -> torch.device:
    """The device this process trains on: ``auto`` is this rank's own GPU when there are GPUs, else
    the CPU. A bare ``cuda`` likewise means this rank's GPU.

    This rank's GPU is ``cuda:<local_rank>`` when the process sees all of its node's GPUs
    (torchrun, ``srun --gpus-per-node``), and the only one it sees when the launcher bound one GPU
    to each process (``srun --gpus-per-task 1``, a per-process ``CUDA_VISIBLE_DEVICES``): there
    every rank's GPU is device 0. Two ranks of one node landing on the same GPU are found once the
    process group exists (:func:`check_distinct_gpus`).
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={requested!r} was requested but CUDA is not available on this machine; use device=cpu or auto")
        if device.index is None:
            count = torch.cuda.device_count()
            if env.local_rank < count:
                device = torch.device("cuda", env.local_rank)
            elif count == 1:
                device = torch.device("cuda", 0)  # bound to this process alone (checked after the group forms)
            else:
                raise DistributedEnvError(
                    f"local rank {env.local_rank} has no GPU of its own: this process sees {count} GPUs "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); start at most "
                    "one process per GPU, and let each see either all of the node's GPUs or only its own")
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device={requested!r}: this process sees {torch.cuda.device_count()} GPU(s) "
                             f"(indices 0..{torch.cuda.device_count() - 1}; CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
        torch.cuda.set_device(device)
    return device


def shared_gpus(placements: list[tuple[str, str]]) -> list[list[int]]:
    """Groups of ranks (two or more) whose ``(host, GPU UUID)`` placements are the same GPU."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, placement in enumerate(placements):
        ranks.setdefault(placement, []).append(rank)
    return [group for group in ranks.values() if len(group) > 1]


def check_distinct_gpus(device: torch.device) -> None:
    """Refuse a layout in which several ranks train on one GPU (every rank raises the same error).

    NCCL refuses it too, but only at the first collective and in its own words; several processes
    of a node each seeing "their" device 0 (one GPU bound to the node, not to each task) is the
    usual cause.
    """
    if device.type != "cuda" or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    placement = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, placement)
    groups = shared_gpus(gathered)
    if groups:
        described = "; ".join(f"ranks {group} on {gathered[group[0]][0]}" for group in groups)
        raise DistributedEnvError(
            f"several processes train on one GPU ({described}): start one process per GPU and bind each to its "
            "own (srun --gpus-per-task 1, or torchrun --nproc_per_node <GPUs of the node> without CUDA_VISIBLE_DEVICES "
            "narrowed to one GPU)")


def ensure_process_group(env: DistEnv, device: torch.device, timeout_minutes: float = 30.0) -> None:
    """Join the default process group for ``env`` (NCCL on GPUs, gloo on CPUs), once per process.

    Nothing happens for a single process or when a group already exists (this process's earlier
    pipeline, or the caller's own). The group lives until the process exits: several pipelines in
    one process (``ltscale demo`` runs three) share it. Tearing it down and joining again would
    rendezvous a second time on the launcher's store, where torchrun's agent keeps the first
    group's keys, and the second join can then hang.
    """
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
        world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if device.type == "cuda" else None,
    )
    atexit.register(leave_process_group)
    check_distinct_gpus(device)


EXIT_DRAIN_S = 0.2
"""How long an exiting gloo rank gives the group's worker threads to finish with their tensors."""


def leave_process_group() -> None:
    """Let gloo's workers finish, then drop the group: run at exit, while the interpreter is still
    whole, and by code that ends a group it made itself (a test's spawned ranks).

    Gloo's worker threads release a finished collective's tensors themselves, which takes the GIL
    when a tensor came from Python. One doing so after interpreter finalization has begun is killed
    by Python (pthread_exit) inside C++ code that may not unwind: "terminate called without an
    active exception", SIGABRT, a non-zero exit after all the work was done (seen in about 1 of 20
    two-rank runs, and in 4 of 6 when collectives were left in flight). Sleeping releases the GIL
    to them for a moment first (0 of 8 then). No collective here: after an error on one rank the
    others may be inside another collective, and a barrier would hang the exit until the timeout.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        time.sleep(EXIT_DRAIN_S)
    gc.collect()
    dist.destroy_process_group()  # NCCL warns at exit about a group never destroyed
    gc.collect()
