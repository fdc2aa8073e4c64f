"""MLflow behind a small interface: pipeline runs, stage runs, lineage tags, plots, a local server."""

from ltscale.tracking.tags import (
    TAG_CACHED,
    TAG_CODE_VERSION,
    TAG_CONFIG_HASH,
    TAG_ERROR,
    TAG_OUTPUT,
    TAG_PARENT_RUNS,
    TAG_PIPELINE,
    TAG_PRODUCED_BY,
    TAG_PRODUCED_WITH_CODE,
    TAG_STAGE,
    join_run_ids,
    split_run_ids,
)
from ltscale.tracking.credentials import redact_uri
from ltscale.tracking.provenance import code_version, uncommitted_changes
from ltscale.tracking.environment import environment_tags, runtime_environment

# What needs MLflow is imported on first use, so that the tags, the code version and the run
# environment serve tools run where MLflow is not installed (the kernel benchmarks on a bare GPU
# machine) instead of failing at import.
_LAZY = {
    **dict.fromkeys(("NullRunHandle", "NullTracker", "RunHandle", "Tracker", "TrackingConfig", "default_tracking_uri"),
                    "ltscale.tracking.mlflow_tracker"),
    **dict.fromkeys(("ServerHandle", "start_local_server", "ui", "ui_command"), "ltscale.tracking.server"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "TAG_CACHED",
    "TAG_CODE_VERSION",
    "TAG_CONFIG_HASH",
    "TAG_ERROR",
    "TAG_OUTPUT",
    "TAG_PARENT_RUNS",
    "TAG_PIPELINE",
    "TAG_PRODUCED_BY",
    "TAG_PRODUCED_WITH_CODE",
    "TAG_STAGE",
    "NullRunHandle",
    "NullTracker",
    "RunHandle",
    "ServerHandle",
    "Tracker",
    "TrackingConfig",
    "code_version",
    "uncommitted_changes",
    "environment_tags",
    "runtime_environment",
    "default_tracking_uri",
    "redact_uri",
    "join_run_ids",
    "split_run_ids",
    "start_local_server",
    "ui",
    "ui_command",
]
