"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
