"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


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
