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
