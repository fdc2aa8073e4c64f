"""MLflow behind a small interface: one parent run per pipeline, one child run per stage.

Everything goes through an ``mlflow.MlflowClient`` bound to this tracker's URI, never through the
fluent API (``mlflow.start_run``, ``mlflow.set_tracking_uri``), so two trackers with different URIs
in one process do not interfere and no "active run" is left behind when a stage raises.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import logging
import math
import os
import re
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    _validate_tag_name,
)

from ltscale.config.overrides import config_to_dict
from ltscale.tracking.attempts import TAG_PID, Attempt
from ltscale.tracking.credentials import redact_uri
from ltscale.tracking.provenance import code_version, uncommitted_changes
from ltscale.tracking.tags import TAG_CODE_VERSION, TAG_ERROR, TAG_PIPELINE, TAG_STAGE

logger = logging.getLogger(__name__)

DEFAULT_STORE_FILE = "mlflow.db"
"""The default local store: ``sqlite:///<output_dir>/mlflow.db``."""
ARTIFACT_DIR = "mlartifacts"
"""Artifacts of experiments created in a local database store live in this directory beside it."""
UNCOMMITTED_PATCH = "code/uncommitted.patch"
"""Pipeline-run artifact when the code version is ``<commit>-dirty``: ``git apply`` it on the commit."""


def default_tracking_uri(output_dir: Path) -> str:
    """``sqlite:////abs/<output_dir>/mlflow.db``: the local store used when no URI is configured.

    SQLite rather than the ``file:`` store, which MLflow 3 deprecates (and which is slow to query).
    """
    return sqlite_uri(Path(output_dir).resolve() / DEFAULT_STORE_FILE)


def sqlite_uri(path: Path) -> str:
    """The ``sqlite:///`` URI of the database file ``path``, percent-encoded.

    SQLAlchemy reads a ``%XX`` in the URI as an escape and a ``?`` as the start of its query, so a
    directory named ``pct%41`` or ``q?x=1`` would name another file. Built with the stdlib, not
    SQLAlchemy's ``URL``: a machine with the file store only may lack SQLAlchemy.
    """
    return "sqlite:///" + urllib.parse.quote(Path(path).as_posix(), safe="/")


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded.

    ``tracking_uri``: ``""`` for the local store under the output directory
    (``sqlite:///<output_dir>/mlflow.db``), otherwise any MLflow URI (``http://host:port``,
    ``sqlite:///path.db``, ``postgresql://...``; ``file:/path`` only with
    ``MLFLOW_ALLOW_FILE_STORE=true``, MLflow 3 having frozen its file store). A bare path is refused:
    MLflow would take it for a file store.
    ``experiment``: MLflow experiment name; created on first use.
    ``run_tags``: ``"key=value"`` tags set on each pipeline run (``ltscale run --tag``), to mark a
    sweep or find one invocation's run among others of the same recipe and seed. Keys under
    ``ltscale.`` and ``mlflow.`` are the system's and refused, and so is what MLflow would refuse
    when the run starts (after the dataset and weights are ready): a key with characters other
    than letters, digits, ``_ - . / :`` and spaces, one that is not a plain relative path
    (``a/../b``), one over 250 characters, a value over 8000.
    """

    tracking_uri: str = ""
    experiment: str = "ltscale"
    run_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ValueError("tracking.experiment is empty: name the MLflow experiment, e.g. 'ltscale'")
        self.tags()  # refuse a malformed or reserved tag with the config, not when the run starts
        if self.tracking_uri:
            check_uri_form(self.tracking_uri, "tracking.tracking_uri")

    def tags(self) -> dict[str, str]:
        """``run_tags`` as a dict; a malformed, reserved or repeated key is a ValueError naming it."""
        tags: dict[str, str] = {}
        for item in self.run_tags:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"tracking.run_tags: {item!r} is not KEY=VALUE (e.g. sweep=lr-0.05)")
            if key.lower().startswith(("ltscale.", "mlflow.")):
                raise ValueError(f"tracking.run_tags: tag {key!r} is reserved (ltscale.* and mlflow.* are set by the system)")
            if key in tags:
                raise ValueError(f"tracking.run_tags: tag {key!r} is given twice ({tags[key]!r} and {value!r})")
            _check_tag(key, value)
            tags[key] = value
        return tags


def _check_tag(key: str, value: str) -> None:
    """A ValueError naming the tag when MLflow would refuse it (its own check of the key's characters
    and form, and its length limits: a longer value would be cut, which a search by tag would miss)."""
    try:
        _validate_tag_name(key)
    except MlflowException as error:
        rule = error.message.split("supplied: ", 1)[-1]
        raise ValueError(f"tracking.run_tags: MLflow refuses the tag key {key!r}: {rule}") from None
    if len(key) > MAX_ENTITY_KEY_LENGTH:
        raise ValueError(f"tracking.run_tags: tag key {key[:40]!r}... is {len(key)} characters; MLflow takes at "
                         f"most {MAX_ENTITY_KEY_LENGTH}")
    if len(value) > MAX_TAG_VAL_LENGTH:
        raise ValueError(f"tracking.run_tags: the value of tag {key!r} is {len(value)} characters; MLflow keeps at "
                         f"most {MAX_TAG_VAL_LENGTH}")


SERVER_PROBE_TIMEOUT_S = 10.0


# Schemes MLflow's tracking stores take (a database URI may name a driver: postgresql+psycopg2://).
_STORE_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_uri_form(uri: str, what: str) -> None:
    """A ValueError naming ``what`` unless ``uri`` is a URI with a scheme MLflow can store runs at
    (its own or a plugin's). A bare path would be taken for a file store; an unknown scheme fails
    later with a message about the model registry."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if not match:
        path = Path(uri).expanduser().resolve()
        store = path if path.suffix == ".db" else path / DEFAULT_STORE_FILE
        raise ValueError(f"{what} {redact_uri(uri)!r} is a path, not a URI: for a database there, use "
                         f"{sqlite_uri(store)}; for a server, http://host:port")
    scheme = match.group(1).lower()
    if scheme.split("+")[0] in _STORE_SCHEMES:
        return
    from importlib.metadata import entry_points

    plugins = sorted({entry.name for entry in entry_points(group="mlflow.tracking_store")})
    if scheme not in plugins:
        raise ValueError(f"{what} {redact_uri(uri)!r}: MLflow has no tracking store for the scheme {scheme!r} (supported: "
                         f"{', '.join(_STORE_SCHEMES + tuple(plugins))}; e.g. sqlite:///runs/mlflow.db or http://host:5000)")


def _is_sqlite(uri: str) -> bool:
    return uri.split(":", 1)[0].lower().split("+")[0] == "sqlite"  # sqlite:, sqlite+pysqlite:


def sqlite_file(uri: str) -> Path | None:
    """The database file a ``sqlite:`` URI names; None for other URIs and an in-memory store.

    Read as SQLAlchemy (which opens it) reads it: ``%XX`` escapes decoded, and a query such as
    ``?timeout=60`` (a longer wait on a locked database) not part of the file name.
    """
    if not _is_sqlite(uri):
        return None
    require_sqlalchemy()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError as error:
        raise ValueError(f"{uri} is not a database URI SQLAlchemy can read ({error})") from None
    return Path(database) if database and database != ":memory:" else None


def check_sqlite_store(uri: str) -> None:
    """A ValueError when a ``sqlite:///`` URI names an existing file that is not an SQLite database
    (MLflow would answer with an SQLAlchemy traceback)."""
    path = sqlite_file(uri)
    if path is None:
        return
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return  # created on first use, or MLflow names the problem
    if header and header != _SQLITE_HEADER:
        raise ValueError(f"{path} is not an SQLite database, so it cannot be the MLflow store {uri}: move the file "
                         "aside, or record elsewhere (--output-dir, or --tracking-uri)")


def require_sqlalchemy() -> None:
    """A ValueError saying what to do when MLflow's database stores cannot work here: a bare GPU
    machine may lack sqlalchemy, and MLflow would say so only when a run starts (after the tool's work)."""
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise ValueError("the MLflow sqlite store needs sqlalchemy, which is not installed: pass --tracking-store "
                         "file, or carry its wheels (tools/fetch_gpu_wheels.sh --sqlite)") from None


def check_server_answers(uri: str) -> None:
    """Fail in seconds, not after MLflow's ~4 minutes of retries, when an http(s) tracking server
    cannot be reached at all (refused, unknown host, no answer). Any HTTP answer, even an error
    status (a proxy asking for credentials), counts as reachable: MLflow's client decides the rest."""
    if not uri.lower().startswith(("http://", "https://")):
        return
    import ssl
    import urllib.error
    import urllib.request

    # urllib takes the user info of http://user:password@host for part of the host name; the probe
    # needs no credentials (a 401 is an answer), so it asks the host alone.
    parts = urllib.parse.urlsplit(uri)
    probe = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        urllib.request.urlopen(probe.rstrip("/") + "/health", timeout=SERVER_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLError):
            return  # something answered with TLS; its certificate is MLflow's to judge (its own CA settings)
        raise MlflowException(f"the MLflow server at {redact_uri(uri)} does not answer ({reason}); check the URI, or start the "
                              "server first", error_code="TEMPORARILY_UNAVAILABLE") from None


def _truncate(value: str, limit: int, what: str) -> str:
    """``value`` cut to ``limit`` characters with a visible marker (and a log line) when too long."""
    if len(value) <= limit:
        return value
    marker = f"...[truncated {len(value)} chars]"
    logger.warning("%s is %d characters, MLflow keeps %d: truncated with a marker", what, len(value), limit)
    return value[: limit - len(marker)] + marker


def _flatten(params: Any) -> dict[str, Any]:
    """Nested dicts / dataclasses to dotted keys; an empty section is kept as ``"{}"``."""
    flat: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        else:
            flat[path] = "{}" if isinstance(node, dict) else node

    tree = config_to_dict(params)
    if not isinstance(tree, dict):
        raise TypeError(f"params must be a dict or a dataclass, got {type(params).__name__}")
    if tree:
        walk(tree, "")
    return flat


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _json_default(value: Any) -> Any:
    """JSON for numpy / torch values (arrays and scalars become lists and Python numbers)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


RETRY_S = 30.0
"""How long the metric sender waits before trying an unreachable tracking server again."""


class _MetricSender:
    """Training-time metrics (per epoch, mid-training evaluations), sent in order on a thread.

    A tracking server that is down for a while (restarted, its network flapping) must not stop a
    training run that has hours to go: MLflow's client retries a failed call for about four
    minutes and then raises. Here those calls happen off the training thread; a batch that fails
    stays at the head of the queue and is tried again every :data:`RETRY_S` seconds, so nothing is
    dropped or reordered, and the stage waits for the queue (:meth:`flush`) before it ends.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self._client = client
        self._run_id = run_id
        self._queue: list[list[Metric]] = []
        self._cond = threading.Condition()
        self._failing_since: float | None = None
        self._busy = False
        self._thread: threading.Thread | None = None

    def put(self, entries: list[Metric]) -> None:
        with self._cond:
            self._queue.extend(_chunks(entries, MAX_METRICS_PER_BATCH))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ltscale-metrics", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = self._queue[0]
                self._busy = True
            try:
                self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            except Exception as error:  # noqa: BLE001 - any failure of the store: keep the batch, try later
                with self._cond:
                    self._busy = False
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        logger.warning("MLflow run %s: the tracking store is not taking metrics (%s); training "
                                       "continues and the metrics are sent when it answers", self._run_id,
                                       redact_uri(str(error)).splitlines()[0][:200] if str(error) else type(error).__name__)
                    self._cond.notify_all()
                time.sleep(RETRY_S)
                continue
            with self._cond:
                self._queue.pop(0)
                self._busy = False
                if self._failing_since is not None:
                    logger.warning("MLflow run %s: the tracking store answers again after %.0f s; queued metrics sent",
                                   self._run_id, time.monotonic() - self._failing_since)
                    self._failing_since = None
                self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait until every queued batch is sent; raise when that takes longer than ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MlflowException(
                        f"MLflow run {self._run_id}: {len(self._queue)} batch(es) of training metrics could not be sent "
                        f"in {timeout:.0f} s (the tracking store has not answered since "
                        f"{time.monotonic() - (self._failing_since or time.monotonic()):.0f} s ago)")
                self._cond.wait(min(left, 1.0))


def _describe_error(error: BaseException) -> str:
    """``Type: message`` for a log line, without a password an MLflow error quotes in its URI."""
    return redact_uri(f"{type(error).__name__}: {error}")


def _describe_end(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt: interrupted (Ctrl-C)"
    if isinstance(error, SystemExit) and error.code == 143:
        return "SystemExit: terminated (SIGTERM)"
    if isinstance(error, SystemExit) and error.code == -1:  # submitit's exit once it has requeued the job
        return "SystemExit: -1 (preempted or timed out; submitit requeued the job)"
    return _describe_error(error)


def _last_sign_of_life(run: Any) -> int:
    """When a run whose process vanished was last heard of (ms): its newest metric, else its start.
    Ending it "now" would count the hours between the crash and the next pipeline as run time."""
    stamps = [metric.timestamp for metric in getattr(run.data, "_metric_objs", []) or []]
    return max([run.info.start_time, *stamps])


def metric_entries(metrics: dict[str, float], step: int | None = None) -> list[Metric]:
    """``metrics`` as MLflow metrics at ``step`` (0 when None), stamped now. Raises ValueError
    naming the key if any value is NaN or infinite, TypeError if one is not a number."""
    timestamp = int(time.time() * 1000)
    step = 0 if step is None else int(step)
    entries = []
    for key, value in metrics.items():
        try:
            number = float(value)  # host sync if a device tensor slips through
        except (TypeError, ValueError) as error:
            raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}") from error
        if not math.isfinite(number):
            raise ValueError(f"metric {key!r} is {number} at step {step}: not finite, refusing to log it")
        entries.append(Metric(key=str(key), value=number, timestamp=timestamp, step=step))
    return entries


def per_class_values(accuracy: Sequence[float], class_counts: Sequence[int]) -> tuple[list[float], list[int]]:
    """Per-class accuracies and training counts as plain lists; a ValueError when their lengths
    differ or an accuracy is infinite (NaN marks a class with no test images: its accuracy is
    undefined, not zero)."""
    values = [float(v) for v in np.asarray(accuracy, dtype=np.float64).reshape(-1)]
    counts = [int(c) for c in np.asarray(class_counts).reshape(-1)]
    if len(values) != len(counts):
        raise ValueError(f"accuracy has {len(values)} entries but class_counts has {len(counts)}")
    bad = [index for index, value in enumerate(values) if math.isinf(value)]
    if bad:
        raise ValueError(f"per-class accuracy of classes {bad[:10]} is not finite")
    return values, counts


class RunHandle:
    """One MLflow run: what a pipeline or stage logs through.

    Every method logs synchronously and raises on failure; nothing is dropped silently. The one
    exception is ``log_metrics(..., background=True)``, for what training logs while it runs: sent
    on a thread, retried while the store is unreachable, waited for when the run ends.
    """

    FLUSH_TIMEOUT_S = 1800.0  # how long a finished stage waits for an unreachable store to take its metrics

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self._client = client
        self.run_id = run_id
        self._sender: _MetricSender | None = None

    def flush(self, timeout: float | None = None) -> None:
        """Send what ``background`` logging still holds; raises if the store does not take it within
        ``timeout`` seconds (:attr:`FLUSH_TIMEOUT_S` when None)."""
        if self._sender is not None:
            self._sender.flush(self.FLUSH_TIMEOUT_S if timeout is None else timeout)

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r})"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, background: bool = False) -> None:
        """Log ``{key: value}`` at ``step`` (0 when None). Keys may contain ``/`` (``test/top1``).

        Raises ValueError naming the key if any value is NaN or infinite; then nothing is logged.
        ``background``: queue them for the sender thread (:class:`_MetricSender`) and return.
        """
        entries = metric_entries(metrics, step)
        if background:
            if self._sender is None:
                self._sender = _MetricSender(self._client, self.run_id)
            self._sender.put(entries)
            return
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params with nested keys flattened (``optim.lr``); long values truncated with a marker.
        A URL's password is stored as ``***`` (a pipeline's params hold its tracking URI).

        MLflow params are immutable: logging a key again with a different value raises.
        """
        entries = [
            Param(key, _truncate(redact_uri(str(value)), MAX_PARAM_VAL_LENGTH, f"param {key!r}"))
            for key, value in _flatten(params).items()
        ]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk, synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) tags; values are converted with ``str`` and truncated past 8000 chars.
        A URL's password is stored as ``***`` (an error's message may quote the tracking URI)."""
        entries = [
            RunTag(str(key), _truncate(redact_uri(str(value)), MAX_TAG_VAL_LENGTH, f"tag {key!r}"))
            for key, value in tags.items()
        ]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as an artifact: YAML for ``.yaml``/``.yml``, JSON otherwise."""
        if artifact_file.endswith((".yaml", ".yml")):
            self._client.log_dict(self.run_id, json.loads(json.dumps(obj, default=_json_default)), artifact_file)
        else:
            text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
            self._client.log_text(self.run_id, text, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as an artifact file."""
        self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path`` (the root when None)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or directory")

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as ``artifact_file`` (``.png``, ``.svg``, ...) and close it."""
        try:
            self._client.log_figure(self.run_id, figure, artifact_file)
        finally:
            close_figure(figure)

    def log_dataset(
        self,
        name: str,
        digest: str,
        source: str,
        context: str,
        num_rows: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record a dataset as an MLflow run input (the run page's "Datasets used").

        ``context`` is the input tag ``mlflow.data.context`` ("training", "evaluation").
        The profile holds ``num_rows`` and ``extra`` (per-class counts, imbalance ratio, ...).
        MLflow keeps at most 36 digest characters; a longer digest is stored whole in the profile.
        """
        if not name or not digest or not context:
            raise ValueError(f"log_dataset needs a name, digest and context, got {name!r}, {digest!r}, {context!r}")
        profile: dict[str, Any] = {"num_rows": int(num_rows), **(extra or {})}
        if len(digest) > MAX_DATASET_DIGEST_SIZE:
            profile["digest"] = digest
            digest = digest[:MAX_DATASET_DIGEST_SIZE]
        if re.match(r"^https?://", source):
            source_type, source_json = "http", {"url": source}
        else:
            source_type, source_json = "local", {"uri": source}
        dataset = Dataset(
            name=name,
            digest=digest,
            source_type=source_type,
            source=json.dumps(source_json),
            profile=json.dumps(profile, default=_json_default, allow_nan=False),
        )
        dataset_input = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._client.log_inputs(self.run_id, datasets=[dataset_input])

    def log_per_class_accuracy(self, accuracy: Sequence[float], class_counts: Sequence[int], prefix: str) -> None:
        """Per-class table (``<prefix>/per_class_accuracy.json`` and ``.csv``) and its plot (``.png``).

        The table lists class index, training count, shot group and accuracy, plus the mean
        accuracy of each shot group (many > 100, medium 20-100, few < 20 training examples).
        """
        from ltscale.tracking.plots import SHOT_GROUPS, per_class_accuracy_figure, shot_group

        values, counts = per_class_values(accuracy, class_counts)
        rows = [
            {"class": index, "train_count": count, "group": shot_group(count), "accuracy": None if math.isnan(value) else value}
            for index, (count, value) in enumerate(zip(counts, values, strict=True))
        ]
        groups = {}
        for group in SHOT_GROUPS:
            members = [row["accuracy"] for row in rows if row["group"] == group and row["accuracy"] is not None]
            groups[group] = {"classes": len(members), "accuracy": sum(members) / len(members) if members else None}
        measured = [row["accuracy"] for row in rows if row["accuracy"] is not None]
        table = {"mean_accuracy": sum(measured) / len(measured) if measured else None, "groups": groups, "classes": rows}

        base = f"{prefix.strip('/')}/per_class_accuracy" if prefix.strip("/") else "per_class_accuracy"
        self.log_dict(table, f"{base}.json")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["class", "train_count", "group", "accuracy"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.log_text(buffer.getvalue(), f"{base}.csv")
        title = f"{prefix.strip('/')}: per-class accuracy" if prefix.strip("/") else "per-class accuracy"
        shown = [(v, c) for v, c in zip(values, counts) if not math.isnan(v)]
        self.log_figure(per_class_accuracy_figure([v for v, _ in shown], [c for _, c in shown], title), f"{base}.png")


def close_figure(figure: Any) -> None:
    """Release a figure: pyplot-managed ones are closed there, plain ``Figure`` objects cleared."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and getattr(figure, "number", None) is not None and pyplot.fignum_exists(figure.number):
        pyplot.close(figure)
    elif hasattr(figure, "clear"):
        figure.clear()


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.init-lock`` (flock) around the first use of a SQLite store.

    MLflow creates and migrates a new SQLite store's schema on first use; several processes doing
    that at once (pipelines of a sweep starting together on one output directory) all fail with
    alembic errors. Other URIs (a server, a database server) need no lock.
    """
    path = sqlite_file(uri)
    if path is None:
        yield
        return
    import fcntl

    lock_path = path.with_name(path.name + ".init-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_CREATING = ".creating"
"""Suffix of a SQLite store whose schema is being created (beside the store, under the init lock)."""


def _create_sqlite_store_atomically(uri: str) -> None:
    """Create a new SQLite store's schema in a temporary file and rename it into place.

    MLflow builds the schema table by table on first use; a run stopped in that window (Ctrl-C
    a second after starting) left a store with half its tables, on which every later command
    failed ("table ... already exists"). Built aside, the store is either absent or whole.
    Call under :func:`_sqlite_init_lock`: a temporary file found there is a dead creation's.
    """
    path = sqlite_file(uri)
    if path is None:
        return
    for stale in path.parent.glob(f".{path.name}.*{_CREATING}*"):  # with SQLite's -journal beside it
        stale.unlink(missing_ok=True)
    if path.exists():
        return
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_CREATING}")
    from sqlalchemy.engine import make_url

    # The same URI but for the file: its query (?timeout=60) applies to the creation too.
    temp_uri = make_url(uri).set(database=temp.as_posix()).render_as_string(hide_password=False)
    try:
        # Any query makes MLflow build (and migrate) the schema of the store it opens.
        MlflowClient(tracking_uri=temp_uri).search_experiments(max_results=1)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


class Tracker:
    """Records a pipeline as one MLflow parent run with a child run per stage.

    The URI is bound per instance (``MlflowClient(uri)``); the MLflow global tracking URI and
    active-run state are never touched.
    """

    def __init__(self, config: TrackingConfig, output_dir: Path) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        if config.tracking_uri:
            self._uri = config.tracking_uri
            check_server_answers(self._uri)
            if redact_uri(self._uri) != self._uri:
                # MLflow prints a link to each run it ends, the URI's password in it (its setting, so
                # a user's own choice stands); the CLI prints the URI redacted instead.
                os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._uri = default_tracking_uri(self.output_dir)
        check_sqlite_store(self._uri)
        with _sqlite_init_lock(self._uri):
            _create_sqlite_store_atomically(self._uri)
            self.client = MlflowClient(tracking_uri=self._uri)
            self.experiment_id = self._ensure_experiment()
        self.code_version = code_version()
        self._active: list[tuple[str, RunHandle]] = []  # (run name, handle), outermost first
        self._pipeline_tag = ""  # TAG_PIPELINE of the active pipeline run

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI this tracker logs to."""
        return self._uri

    def _artifact_location(self) -> str | None:
        """Artifact root for a new experiment; None lets the store (or server) decide."""
        scheme = self._uri.split(":", 1)[0].lower()
        if _is_sqlite(self._uri):
            path = sqlite_file(self._uri)
            if path is not None:
                return (path.resolve().parent / ARTIFACT_DIR).as_uri()
            return (self.output_dir.resolve() / ARTIFACT_DIR).as_uri()
        if scheme in {"postgresql", "mysql", "mssql"} or scheme.startswith(("postgresql+", "mysql+", "mssql+")):
            # Without it MLflow would put artifacts in ./mlruns of whatever the working directory is.
            return (self.output_dir.resolve() / ARTIFACT_DIR).as_uri()
        return None  # http(s): the server's artifact root; file: store keeps them under its root

    def _ensure_experiment(self) -> str:
        name = self.config.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_location())
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another process won the race
                    raise
                experiment = self.client.get_experiment_by_name(name)
                assert experiment is not None
        if experiment.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} at {redact_uri(self._uri)} is deleted: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or set tracking.experiment to another name"
            )
        return experiment.experiment_id

    def _default_tags(self) -> dict[str, str]:
        tags = {
            **Attempt.current().tags(),  # who owns the run, so a later attempt can tell if it was abandoned
            TAG_CODE_VERSION: self.code_version,
            MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_SOURCE_NAME: Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        }
        if re.fullmatch(r"[0-9a-f]{40}(-dirty)?", self.code_version):
            tags[MLFLOW_GIT_COMMIT] = self.code_version.removesuffix("-dirty")
        try:
            tags[MLFLOW_USER] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            pass
        return tags

    @contextmanager
    def _run(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[RunHandle]:
        run = self.client.create_run(self.experiment_id, run_name=name)
        handle = RunHandle(self.client, run.info.run_id)
        self._active.append((name, handle))
        try:
            handle.set_tags(tags)
            handle.log_params(params)
            yield handle
            handle.flush()  # a run that finishes has all its metrics
        except BaseException as error:
            status = RunStatus.KILLED if isinstance(error, (KeyboardInterrupt, SystemExit)) else RunStatus.FAILED
            self._end(handle, RunStatus.to_string(status), error)
            raise
        else:
            self.client.set_terminated(handle.run_id, RunStatus.to_string(RunStatus.FINISHED))
        finally:
            self._active.pop()

    def _end(self, handle: RunHandle, status: str, error: BaseException) -> None:
        """Mark a run as ended by ``error``; a failure here must not hide the original exception."""
        try:
            handle.flush(10.0)  # what training queued, if the store takes it at once
        except Exception:  # noqa: BLE001
            logger.warning("run %s ends with training metrics the tracking store did not take", handle.run_id)
        try:
            handle.set_tags({TAG_ERROR: _describe_end(error)})
        except Exception as failure:  # noqa: BLE001 - a warning, not a traceback: MLflow's would show the URI's password
            logger.warning("could not record the error of run %s: %s", handle.run_id, _describe_error(failure))
        try:
            self.client.set_terminated(handle.run_id, status)
        except Exception as failure:  # noqa: BLE001
            logger.warning("could not mark run %s as %s: %s", handle.run_id, status, _describe_error(failure))

    def end_abandoned_runs(self) -> list[str]:
        """Mark KILLED the RUNNING runs of this experiment whose process is certainly gone; their ids.

        See :mod:`ltscale.tracking.attempts` for when that is certain (an earlier attempt of this SLURM
        job, or an exited process of this machine). Each gets ``ltscale.error`` saying why.
        """
        here = Attempt.current()
        abandoned, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000, page_token=token)
            for run in page:
                if TAG_PID not in run.data.tags:
                    continue  # not an ltscale run, or from a version that did not record its owner
                reason = here.owner_gone(run.data.tags)
                if reason is not None:
                    abandoned.append((run, reason))
            token = page.token
            if not token:
                break
        # Each ends when it was last heard of; a pipeline's parent logs nothing while its stages run,
        # so it ends with the latest of its abandoned stage runs.
        last = {run.info.run_id: _last_sign_of_life(run) for run, _ in abandoned}
        for run, _ in abandoned:
            parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
            if parent in last:
                last[parent] = max(last[parent], last[run.info.run_id])
        ended = []
        for run, reason in abandoned:
            self.client.set_tag(run.info.run_id, TAG_ERROR, f"ProcessGone: {reason}")
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED), end_time=last[run.info.run_id])
            ended.append(run.info.run_id)
        if ended:
            logger.warning("marked %d MLflow run(s) of abandoned attempts as KILLED: %s", len(ended), ", ".join(ended))
        return ended

    @contextmanager
    def pipeline_run(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[RunHandle]:
        """The parent run of one pipeline; FAILED (KILLED on Ctrl-C or a preemption exit) if the body raises, which propagates.

        Runs that earlier, abandoned attempts left RUNNING are marked KILLED first (:meth:`end_abandoned_runs`).
        """
        if self._active:
            raise RuntimeError(f"pipeline run {self._active[0][0]!r} is still active; pipeline runs do not nest")
        try:
            self.end_abandoned_runs()
        except Exception as error:  # noqa: BLE001 - tidying the record of dead runs must not stop a live one
            logger.warning("could not check %s for runs abandoned by earlier attempts: %s", redact_uri(self._uri),
                           _describe_error(error))
        # The user's tags first: the system's own (lineage, attempt ownership) cannot be overridden.
        all_tags = {**self.config.tags(), **self._default_tags(), TAG_PIPELINE: name, **tags}
        self._pipeline_tag = all_tags[TAG_PIPELINE]  # its stage runs carry the same (the run name may differ)
        with self._run(name, params, all_tags) as handle:
            if self.code_version.endswith("-dirty"):
                # The commit alone does not say what ran; the patch on top of it does.
                patch = uncommitted_changes()
                if patch:
                    handle.log_text(patch, UNCOMMITTED_PATCH)
            yield handle

    @contextmanager
    def stage_run(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[RunHandle]:
        """A child run (tag ``mlflow.parentRunId``) of the innermost active run, normally the pipeline run.

        FAILED (KILLED on Ctrl-C or a preemption exit) if the body raises; the exception propagates.
        """
        if not self._active:
            raise RuntimeError(f"stage_run({stage!r}) needs an active pipeline_run")
        parent = self._active[-1][1]
        all_tags = {
            **self._default_tags(),
            TAG_PIPELINE: self._pipeline_tag,
            TAG_STAGE: stage,
            MLFLOW_PARENT_RUN_ID: parent.run_id,
            **tags,
        }
        with self._run(stage, params, all_tags) as handle:
            yield handle


class NullRunHandle:
    """The run handle of a rank other than 0 in a multi-process run: it records nothing.

    Rank 0 logs the pipeline; the other ranks run the same code and their logging calls go here,
    so stages need no rank checks around each metric. ``run_id`` is empty.
    """

    run_id = ""

    def __repr__(self) -> str:
        return "NullRunHandle()"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, background: bool = False) -> None: ...
    def flush(self) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dict(self, obj: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        close_figure(figure)

    def log_dataset(self, *args: Any, **kwargs: Any) -> None: ...
    def log_per_class_accuracy(self, accuracy: Sequence[float], class_counts: Sequence[int], prefix: str) -> None: ...


class NullTracker:
    """:class:`Tracker`'s stand-in on ranks other than 0: same interface, records nothing.

    ``tracking_uri`` is the URI rank 0 logs to, so every rank reports where the record is.
    """

    def __init__(self, config: TrackingConfig, output_dir: Path) -> None:
        self.config = config
        self._uri = config.tracking_uri or default_tracking_uri(Path(output_dir))

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @contextmanager
    def pipeline_run(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[NullRunHandle]:
        yield NullRunHandle()

    @contextmanager
    def stage_run(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[NullRunHandle]:
        yield NullRunHandle()
