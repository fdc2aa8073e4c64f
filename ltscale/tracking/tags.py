"""Tag names that record lineage between ltscale runs (re-exported by ``ltscale.tracking``).

A stage run carries the config hash and code version it ran with, the stage runs whose outputs it
consumed, and the path of what it stored, so the MLflow UI can show where a model came from and the
pipeline can skip a stage whose inputs are unchanged.
"""

TAG_STAGE = "ltscale.stage"
"""Stage name (``teacher``, ``rebalance``, ...); set by ``Tracker.stage_run``."""

TAG_PIPELINE = "ltscale.pipeline"
"""Name of the pipeline run; set on the pipeline run and on each of its stage runs."""

TAG_CONFIG_HASH = "ltscale.config_hash"
"""``ltscale.config.config_hash`` of the stage config and its parents' hashes."""

TAG_CODE_VERSION = "ltscale.code_version"
"""``ltscale.tracking.code_version()``; set on every run unless the caller passes its own."""

TAG_PARENT_RUNS = "ltscale.consumed_runs"
"""Comma-separated run ids of the stage runs whose outputs this stage consumed."""

TAG_OUTPUT = "ltscale.output"
"""Absolute path of the output this stage stored (checkpoint, soft labels, ...), on the file system
of the machine in ``ltscale.attempt.machine`` (``<host name>/...``)."""

TAG_CACHED = "ltscale.cached"
"""``"true"`` when the stage was skipped because its output already existed."""

TAG_PRODUCED_BY = "ltscale.produced_by"
"""With ``TAG_CACHED``: the run id that produced the reused output."""

TAG_PRODUCED_WITH_CODE = "ltscale.produced_with_code"
"""With ``TAG_CACHED``: the code version that produced the reused output (and the metrics the run
shows again), from its manifest; the run's ``TAG_CODE_VERSION`` is the code that reused it. On a
pipeline run: the versions behind its stages' outputs, comma-separated, when they are not all its own."""

TAG_ERROR = "ltscale.error"
"""``ExceptionType: message`` of the exception that ended a FAILED run; set by the tracker."""


def join_run_ids(run_ids: "list[str] | tuple[str, ...]") -> str:
    """The ``TAG_PARENT_RUNS`` value for ``run_ids`` (order kept, duplicates dropped)."""
    seen: dict[str, None] = {}
    for run_id in run_ids:
        if not run_id or "," in run_id:
            raise ValueError(f"not a run id: {run_id!r}")
        seen.setdefault(run_id, None)
    return ",".join(seen)


def split_run_ids(value: str) -> list[str]:
    """Inverse of ``join_run_ids``: ``""`` gives ``[]``."""
    return [part for part in value.split(",") if part]
