"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Without a GPU the Triton kernels are tested under Triton's interpreter. Triton reads this when it
# first initialises, and any earlier test may import it (torch.compile does), so set it before
# every test module: pipelines are unaffected, since backend "auto" uses the kernels on CUDA only.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass


MAX_WORKERS = 4
"""Most test processes ``-n auto`` starts. The suite's length is bounded below by its longest file
(one worker runs a file), which more than four workers hardly shorten."""


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run the suite in parallel, a file per worker, when pytest-xdist is installed, no ``-n`` was
    given (``-n 0`` runs it in this process, for ``--pdb`` or ``-s``) and more than one file may run.

    Why by default: most of the suite's time is spent starting processes (torchrun ranks, FFCV
    writers, SLURM jobs), each one importing torch on one core, so two workers on two cores take
    about two thirds of the time of one. Why by file: a file's module fixtures (trees of JPEGs, the
    CIFAR arrays) are built once, and the SLURM cluster its tests share starts once. Done here, not
    in ``addopts``: a machine without xdist (the GPU machine) then runs the tests serially instead of
    refusing ``-n``. Runs before xdist's own hook (conftest plugins register after it, and the later
    of two ``tryfirst`` implementations runs first), which turns ``auto`` into a count."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):  # none, or inside a worker
        return
    files = {arg.split("::")[0] for arg in config.args}
    if len(files) == 1 and next(iter(files)).endswith(".py"):  # one file runs in one worker anyway: no gain, only its start
        return
    if config.option.numprocesses is None:  # (with --pdb, xdist itself turns auto into none)
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            config.option.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown to pytest without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: the CPUs this process may use (a SLURM job's or a container's share, not the
    host's count), at most :data:`MAX_WORKERS`, none with one; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides
    when set (xdist's own hook reads it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_WORKERS) if cpus > 1 else 0  # one CPU: in this process (a worker would only add its start)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI (``http://127.0.0.1:<port>``) of a real MLflow server, started once per test session.

    Backed by SQLite and a local artifact directory in a session temp dir; stopped at the end.
    Use a unique experiment name per test so tests do not see each other's runs.
    """
    from ltscale.tracking.server import start_local_server

    root = tmp_path_factory.mktemp("mlflow-server")
    with start_local_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts") as server:
        yield server.uri


@pytest.fixture
def load_tool() -> Callable[[str], object]:
    """Import a script under tools/ by its path (``load_tool("bench/kd_loss.py")``), to call its
    ``main`` or helpers in this process."""

    def load(relative: str):
        path = Path(__file__).resolve().parents[1] / "tools" / relative
        name = "tool_" + relative.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # a script's dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
