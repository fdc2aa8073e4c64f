"""A local MLflow tracking server for tests and ``ltscale ui``.

``start_local_server`` runs ``mlflow server`` in its own process group and waits for ``/health``;
leaving the ``with`` block terminates the whole group (uvicorn spawns workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ltscale.dist.ports import free_port
from ltscale.tracking.mlflow_tracker import ARTIFACT_DIR, default_tracking_uri

_SERVER_ENV = {
    # Without it MLflow 3 starts a job-execution worker pool (7 extra processes) next to the server.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def _server_env() -> dict[str, str]:
    return {**os.environ, **_SERVER_ENV}


class ServerHandle:
    """A running ``mlflow server``; a context manager that stops it on exit.

    ``uri`` is the tracking URI (``http://127.0.0.1:<port>``), ``log_path`` the server's output.
    """

    def __init__(self, process: subprocess.Popen, port: int, log_dir: Path) -> None:
        self.process = process
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self._log_dir = log_dir
        self.log_path = log_dir / "mlflow-server.log"

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle(uri={self.uri!r}, pid={self.process.pid})"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def healthy(self) -> bool:
        """True if ``GET /health`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout`` s; idempotent."""
        _stop_group(self.process, timeout)
        shutil.rmtree(self._log_dir, ignore_errors=True)


def _stop_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``process`` (started with start_new_session=True, so its pgid is
    its pid), SIGKILL it after ``timeout`` s; idempotent. ``mlflow server`` / ``mlflow ui`` run
    uvicorn in a child of their own, which a signal to mlflow's process alone leaves serving."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=timeout)
    else:
        # The main process is gone; make sure no worker of its group lingers.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _launch(backend_store_uri: str, artifact_root: str, port: int, log_dir: Path) -> ServerHandle:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifact_root,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log_file = open(log_dir / "mlflow-server.log", "wb")  # noqa: SIM115 - the child keeps writing to it
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_server_env(),
            start_new_session=True,
        )
    finally:
        log_file.close()
    return ServerHandle(process, port, log_dir)


def start_local_server(
    backend_store_uri: str,
    artifact_root: str | Path,
    port: int | None = None,
    timeout: float = 60.0,
) -> ServerHandle:
    """Start ``mlflow server`` on 127.0.0.1 and return once ``/health`` answers.

    ``artifact_root``: where the server stores proxied artifacts (a directory or URI).
    ``port``: None picks a free one (retried if another process grabs it first).
    Raises RuntimeError with the server's output if it exits or is not healthy within ``timeout`` s.
    """
    artifact_root = str(artifact_root)
    attempts = 3 if port is None else 1
    failure = ""
    for _ in range(attempts):
        log_dir = Path(tempfile.mkdtemp(prefix="ltscale-mlflow-server-"))
        handle = _launch(backend_store_uri, artifact_root, port or free_port(), log_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and handle.process.poll() is None:
            if handle.healthy():
                return handle
            time.sleep(0.25)
        failure = (
            f"mlflow server on port {handle.port} "
            + (f"exited with code {handle.process.returncode}" if handle.process.poll() is not None
               else f"was not healthy after {timeout:.0f} s")
            + f"; its output:\n{handle.log_tail()}"
        )  # fmt: skip
        port_taken = "address already in use" in handle.log_tail().lower()
        handle.stop()
        if not port_taken:
            break
    raise RuntimeError(failure)


def ui_command(output_dir: Path, port: int = 5000, host: str = "127.0.0.1") -> list[str]:
    """argv of ``mlflow ui`` over the default local store of ``output_dir``."""
    output_dir = Path(output_dir).resolve()
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", default_tracking_uri(output_dir),
        # Experiments created by the tracker carry their own artifact location; this only covers
        # experiments created from the UI, which would otherwise write to ./mlartifacts.
        "--artifacts-destination", str(output_dir / ARTIFACT_DIR),
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


def ui(output_dir: Path, port: int = 5000, host: str = "127.0.0.1") -> int:
    """Run the MLflow UI over ``output_dir``'s runs until interrupted; returns its exit code."""
    store = Path(output_dir).resolve() / "mlflow.db"
    if not store.exists():
        print(f"note: {store} does not exist yet; the UI will show an empty store", file=sys.stderr)
    print(f"MLflow UI for {output_dir} at http://{host}:{port}", file=sys.stderr)
    # Its own process group, stopped as a whole when this process ends however it ends: ``kill``
    # and a closed terminal signal only this process, and Ctrl-C no longer reaches the group, so
    # SIGTERM and SIGHUP are turned into an exit that passes through the `finally`. A signal this
    # process was started ignoring stays ignored (``nohup ltscale ui &`` outlives its terminal).
    main_thread = threading.current_thread() is threading.main_thread()
    handled = [signum for signum in (signal.SIGTERM, signal.SIGHUP) if main_thread and signal.getsignal(signum) != signal.SIG_IGN]
    previous = {signum: signal.signal(signum, _exit_on_signal) for signum in handled}
    process = None
    try:
        process = subprocess.Popen(ui_command(output_dir, port=port, host=host), env=_server_env(), start_new_session=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process is not None:
            _stop_group(process)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
