"""Run a pipeline: each stage in order, skipped when its output already exists, tracked in MLflow.

For every stage the pipeline computes a lineage key from the stage config, the keys of the
outputs it consumes, the training data's fingerprint, the seed and the precision. A finished
output with that key is reused (a child run tagged ``ltscale.cached=true`` points at the run that
produced it); an unfinished one resumes from its progress checkpoint. One parent MLflow run per
pipeline, one child run per stage, tags linking each stage run to the runs it consumed.

Launched as several processes (``torchrun``, ``srun``, ``launch/submit.py --tasks-per-node``), the
pipeline joins them in one process group (``ltscale.dist.runtime``): every rank runs every stage
on its share of the data, rank 0 alone writes stage outputs and the MLflow record, and rank 0's
view of the store (which stage is finished, what its manifest says) is broadcast, so all ranks
take the same path. The output directory must be one shared directory for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ltscale.config import config_hash, flatten_config
from ltscale.data import build_dataset
from ltscale.data.base import DatasetBundle, FileSplit
from ltscale.data.config import IN_MEMORY_DATASETS
from ltscale.data.errors import DatasetError
from ltscale.dist import runtime
from ltscale.dist.gather import all_gather_object, barrier, broadcast_object, is_main_process, rank_and_world_size
from ltscale.engine.checkpoint import atomic_write_json, remove_interrupted_writes
from ltscale.engine.progress import Progress
from ltscale.engine.schedule import OptimConfig
from ltscale.engine.trainer import saved_progress
from ltscale.losses.modules import LossConfig
from ltscale.models import pretrained
from ltscale.models.moco import MoCoConfig
from ltscale.stages import distill, evaluate, locks, rebalance, soft_labels, teacher, virtual_examples
from ltscale.stages.config import DistillConfig, PipelineConfig, RebalanceConfig, StageConfig, TeacherConfig, stage_inputs
from ltscale.stages.context import StageContext
from ltscale.stages.store import PROGRESS, StageOutput, Store
from ltscale.tracking import (
    TAG_CACHED,
    TAG_CODE_VERSION,
    TAG_CONFIG_HASH,
    TAG_OUTPUT,
    TAG_PARENT_RUNS,
    TAG_PIPELINE,
    TAG_PRODUCED_BY,
    TAG_PRODUCED_WITH_CODE,
    NullTracker,
    Tracker,
    code_version,
    environment_tags,
    join_run_ids,
    runtime_environment,
)

logger = logging.getLogger(__name__)

RUNNERS: dict[str, Callable[..., dict[str, str]]] = {
    "teacher": teacher.run,
    "rebalance": rebalance.run,
    "soft_labels": soft_labels.run,
    "distill": distill.run,
    "virtual_examples": virtual_examples.run,
    "evaluate": evaluate.run,
}


@dataclass
class PipelineResult:
    name: str
    run_id: str
    tracking_uri: str
    result_stage: str
    outputs: dict[str, StageOutput] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    def metrics(self, stage: str | None = None) -> dict[str, float]:
        return dict(self.outputs[stage or self.result_stage].manifest.get("metrics", {}))


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means for this process (its own GPU under a multi-process launch)."""
    return runtime.device_for(runtime.detect(), name)


def data_identity(config: PipelineConfig, bundle: DatasetBundle) -> str:
    """What a stage's result depends on in the data: every split's contents (the test split's too:
    a stage's output includes its test metrics; the validation split's: tau-norm picks tau on it)
    and the settings that change the pixels a model sees.

    Left out on purpose: where the data lives (``data.root``, the list and annotation paths; the
    contents are in the fingerprints), so a copy on node-local disk reuses the stages; and how fast
    it is read (backend, workers, bad-image budget): the backends deliver the same augmentation.
    FFCV's stored resolution and quality do change the pixels, so they count when it is the backend.
    """
    data, loader = config.data, config.data.loader
    # Only settings the dataset uses: data.image_size is the crop size of image files (CIFAR is
    # 32 px, the generated set has its own size), and which CIFAR subset is in the training
    # split's fingerprint already (so is imbalance_factor's effect for every dataset).
    settings: dict[str, Any] = {"dataset": data.dataset, "cutout": loader.cutout}
    if data.dataset == "synthetic":
        settings["synthetic"] = data.synthetic
    if isinstance(bundle.train, FileSplit):
        settings["image_size"] = data.image_size
        if loader.backend == "ffcv":
            settings["ffcv"] = (loader.ffcv.max_resolution, loader.ffcv.jpeg_quality)
    splits = {role: split.fingerprint() for role, split in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
              if split is not None}
    return config_hash(settings, splits)


def stage_key(stage: StageConfig, parents: dict[str, StageOutput], data: str, config: PipelineConfig,
              init: pretrained.InitWeights | None = None) -> str:
    """The identity of a stage's output: its config (:func:`_result_fields`), its inputs' keys,
    ``data`` (:func:`data_identity`), the seed and the precision setting (and the weights it starts from)."""
    parts = [_result_fields(stage, init), {role: out.key for role, out in sorted(parents.items())}, data, config.seed,
             config.precision]
    if init is not None:  # the weights themselves, not only the path that named them
        parts.append(init.identity)
    return config_hash(*parts)


def _result_fields(stage: StageConfig, init: pretrained.InitWeights | None) -> StageConfig:
    """The stage config as its key sees it: fields that cannot change the output set to their defaults,
    so changing them reuses the stage. ``eval_every`` (how often the test set is evaluated during
    training: logging only), the distillation loss ``backend`` (Triton kernel or PyTorch, the same
    loss), settings of parts that are switched off (MoCo while ``moco_weight`` is 0,
    ``rotation_batch_norm`` while ``rotation_weight`` is 0, LDAM's margin and scale for other losses,
    DRW's beta without DRW, milestones outside a step schedule, tau-norm's optimiser and sampler, tau
    when it is searched or unused, a student's T and p when ``temperature_from`` chooses them), and
    the ``init_from`` spelling when the
    weights' identity (their hash) is in the key instead: a copy elsewhere is the same start."""
    changes: dict[str, Any] = {}
    if getattr(stage, "eval_every", 0):
        changes["eval_every"] = 0
    loss = getattr(stage, "loss", None)
    if isinstance(loss, LossConfig):  # LDAM's margin and scale only for LDAM, DRW's beta only with DRW
        plain = LossConfig()
        unused = {"ldam_max_margin": plain.ldam_max_margin, "ldam_scale": plain.ldam_scale} if loss.kind != "ldam" else {}
        if not loss.drw_epoch:
            unused["drw_beta"] = plain.drw_beta
        if any(getattr(loss, name) != value for name, value in unused.items()):
            changes["loss"] = dataclasses.replace(loss, **unused)
    optim = getattr(stage, "optim", None)
    if isinstance(optim, OptimConfig) and optim.schedule != "step":  # milestones only shape a step schedule
        plain_optim = OptimConfig()
        changes["optim"] = dataclasses.replace(optim, milestones=plain_optim.milestones, decay_factors=plain_optim.decay_factors)
    if isinstance(stage, RebalanceConfig):
        plain_rebalance = RebalanceConfig()
        if stage.method == "tau_norm":  # no training: its optimiser and sampler do nothing
            changes["optim"], changes["sampler"] = plain_rebalance.optim, plain_rebalance.sampler
            if stage.tau_search:  # the grid's best replaces the configured tau
                changes["tau"] = plain_rebalance.tau
        else:
            changes["tau"], changes["tau_search"] = plain_rebalance.tau, plain_rebalance.tau_search
    if isinstance(stage, DistillConfig):
        changes["backend"] = "auto"
        if stage.temperature_from:  # the virtual_examples stage's choice (its key is a parent's) replaces T and p
            plain_distill = DistillConfig()
            changes["temperature"], changes["power"] = plain_distill.temperature, plain_distill.power
    if isinstance(stage, TeacherConfig) and stage.moco_weight == 0:
        changes["moco"] = MoCoConfig()
    if isinstance(stage, TeacherConfig) and stage.rotation_weight == 0:
        changes["rotation_batch_norm"] = "joint"
    if init is not None and getattr(getattr(stage, "model", None), "init_from", ""):
        changes["model"] = dataclasses.replace(stage.model, init_from="")
    return dataclasses.replace(stage, **changes) if changes else stage


def stage_seed(key: str) -> int:
    """The global torch seed a stage starts from: its key (which holds the pipeline seed), as a
    non-negative 63-bit integer."""
    return int(key, 16) % (1 << 63)


def _resolve_init_weights(config: PipelineConfig) -> dict[str, pretrained.InitWeights]:
    """Every stage's ``model.init_from``, found (or downloaded) before any stage trains.

    A missing checkpoint for the student must not surface after hours of teacher training. Rank 0
    resolves first (one download); the others then find the file where it put it, or resolve it
    themselves where the cache is not shared; all use rank 0's identity in their stage keys.
    """
    specs = {name: stage.model.init_from for name, stage in config.stages.items()
             if getattr(getattr(stage, "model", None), "init_from", "")}
    resolved: dict[str, pretrained.InitWeights] = {}
    error = None
    if is_main_process():
        found: dict[str, pretrained.InitWeights] = {}
        for name, spec in specs.items():
            try:
                resolved[name] = found[spec] = found.get(spec) or pretrained.resolve(spec)
            except pretrained.PretrainedWeightsError as failure:
                error = f"stage {name}: {failure}"
                break
    answer = broadcast_object((resolved, error))
    if answer[1]:
        raise pretrained.PretrainedWeightsError(answer[1])
    if is_main_process():
        return resolved
    local = {spec: pretrained.resolve(spec, identify=False) for spec in set(specs.values())}
    return {name: dataclasses.replace(local[spec], identity=answer[0][name].identity) for name, spec in specs.items()}


def _check_stage_data(config: PipelineConfig, bundle: DatasetBundle) -> None:
    """Refuse, before anything trains, a stage that needs a split the data does not have."""
    for name, stage in config.stages.items():
        # (lws and crt ignore tau_search, as they do tau)
        if getattr(stage, "method", None) == "tau_norm" and stage.tau_search and bundle.val is None:
            # Image-list datasets can be given a validation list; the in-memory ones (CIFAR-LT, the
            # generated set) have no validation split at all.
            fix = (f"set data.val_list to the validation list (for {config.data.dataset} the standard one is "
                   "looked for in data.root), or " if config.data.dataset not in IN_MEMORY_DATASETS else "")
            raise DatasetError(
                f"stages.{name}.tau_search is true, so tau-norm sweeps tau on a validation split, and "
                f"{bundle.name} has none: {fix}--set stages.{name}.tau_search=false to keep the fixed stages.{name}.tau."
            )


def _verify_evaluation_images(config: PipelineConfig, bundle: DatasetBundle, output_dir: Path) -> None:
    """Decode every validation and test image once, before any stage trains.

    Evaluation has no substitute for a corrupt image (its accuracy would be over other images), so
    one would stop the run; found after the first stage's hours of training, that helps no one.
    Training images are not decoded here: a bad one is replaced as it is met. A verified split is
    remembered in ``<output_dir>/verified/`` (by its contents and root), so reruns skip the pass.
    """
    from ltscale.data.loaders.files import verify_images

    problem = None
    if is_main_process():
        for split in (bundle.val, bundle.test):
            if not isinstance(split, FileSplit):
                continue
            fingerprint = split.fingerprint()
            marker = output_dir / "verified" / f"{split.name.replace('/', '-')}-{config_hash(str(split.root), fingerprint)}.json"
            if marker.is_file():
                continue
            started = time.monotonic()
            # Worker processes only pay for themselves on more than a few thousand files.
            bad = verify_images(split, num_workers=config.data.loader.num_workers if len(split) > 2000 else 0)
            if bad:
                shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                problem = (f"{len(bad)} of the {len(split)} images of {split.name} cannot be decoded: {shown}. "
                           "Evaluation never substitutes images; repair them or remove them from the split list "
                           "(`ltscale data verify` lists every unreadable file).")
                break
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json({"split": split.name, "root": str(split.root), "images": len(split),
                               "fingerprint": fingerprint, "seconds": round(time.monotonic() - started, 1)}, marker)
    problem = broadcast_object(problem)
    if problem:
        raise DatasetError(problem)


@dataclass
class StagePlan:
    """What running the pipeline now would do with one stage."""

    name: str
    kind: str
    key: str
    inputs: dict[str, str]  # role -> stage name
    state: str  # "finished" (reused), "busy" (another pipeline is producing it), "partial" (resumes) or "new"
    directory: Path
    progress: frozenset[str] = frozenset()  # a partial stage's saved progress: "plain" and / or "deepspeed"


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    """Each stage's key and whether a run now would reuse, resume or train it; trains nothing.

    Reads the split lists (and checks the files they name) and hashes local ``init_from`` files:
    the same keys :func:`run_pipeline` computes. One process; nothing is downloaded or trained
    (checking a finished output may re-hash a file whose time changed and note it in the store's
    ``verified.json``, as a run would).
    """
    bundle = build_dataset(config.data)
    _check_stage_data(config, bundle)
    identity = data_identity(config, bundle)
    store = Store(_absolute(config.output_dir))
    keys: dict[str, str] = {}
    plans = []
    for name, stage in config.stages.items():
        inputs = stage_inputs(stage)
        parents = {role: StageOutput(parent, config.stages[parent].kind, keys[parent], Path(), {}) for role, parent in inputs.items()}
        spec = getattr(getattr(stage, "model", None), "init_from", "")
        init = pretrained.InitWeights(spec, Path(), pretrained.identity(spec)) if spec else None
        keys[name] = key = stage_key(stage, parents, identity, config, init)
        directory = store.directory(stage.kind, key)
        progress = saved_progress(directory / PROGRESS)
        if store.finished(name, stage.kind, key) is not None:
            state = "finished"
        elif locks.live_holder(directory):  # a dead owner's lock would be taken over, not waited for
            state = "busy"
        elif progress:
            state = "partial"
        else:
            state = "new"
        plans.append(StagePlan(name, stage.kind, key, dict(inputs), state, directory, frozenset(progress)))
    return plans


def run_pipeline(config: PipelineConfig, progress: Progress | None = None) -> PipelineResult:
    """Run every stage of ``config``; returns the outputs and the MLflow parent run id.

    One process, or one of several when the environment says so (``ltscale.dist.runtime``)."""
    env = runtime.detect()
    device = resolve_device(config.device)
    runtime.ensure_process_group(env, device)
    return _run_pipeline(config, device, progress)


def _build_dataset_checked_per_node(config: PipelineConfig) -> DatasetBundle:
    """The dataset, with the image files' existence checked by one process per node.

    Every rank reads the split lists; only local rank 0 lists the image folders (each node its own:
    the images may be a node-local copy), and every rank learns every node's verdict, so all raise
    the same error or none does. Sixteen ranks each listing iNat18's 8,142 folders twice loaded a
    shared file system's metadata server for nothing.
    """
    if rank_and_world_size()[1] == 1 or config.data.dataset in IN_MEMORY_DATASETS:
        return build_dataset(config.data)
    bundle, own = None, None
    try:
        bundle = build_dataset(config.data, check_files=runtime.detect().local_rank == 0)
    except Exception as caught:  # noqa: BLE001 - every rank must reach the gather, then all raise
        own = caught
    verdict = f"{own} (seen by rank {rank_and_world_size()[0]} on {socket.gethostname()})" if own is not None else None
    errors = [e for e in all_gather_object(verdict) if e]
    if own is not None:
        raise own
    if errors:
        raise DatasetError(errors[0])
    assert bundle is not None
    return bundle


def _check_shared_directory(output_dir: Path) -> None:
    """Every rank must see rank 0's files (it reads the models rank 0 saves): fail at the start,
    with the reason, rather than at the first stage boundary.

    The marker's name is this pipeline's own (rank 0's random token): the pipelines of a sweep
    share ``output_dir`` and start together, and with one fixed name they wrote and deleted each
    other's marker and failed this check on a directory that was shared.
    """
    if rank_and_world_size()[1] == 1:
        return
    token = uuid.uuid4().hex
    if is_main_process():
        (output_dir / f".ltscale-shared-check-{token}").write_text(token)
    token = broadcast_object(token if is_main_process() else None)  # after the write: the others look next
    marker = output_dir / f".ltscale-shared-check-{token}"
    sees = all_gather_object(marker.is_file() and marker.read_text() == token)  # every rank learns who cannot see it
    barrier()
    if is_main_process():
        marker.unlink(missing_ok=True)
    if not all(sees):
        blind = [rank for rank, ok in enumerate(sees) if not ok]
        raise RuntimeError(
            f"output_dir {output_dir} is not the same directory on every process: rank(s) {blind} do not see "
            "rank 0's files there. Put output_dir on a file system all nodes share."
        )


POLL_S = 5.0
"""How often a pipeline waiting for another one's stage output looks again."""


def _finished_or_claimed(store: Store, name: str, kind: str, key: str) -> tuple[StageOutput | None, locks.StageLock | None]:
    """The finished output, or (rank 0 only) the lock to produce it; waits while another pipeline does.

    Every rank goes round the loop, so a long wait is many short collectives rather than one that
    would outlast the process group's timeout.
    """
    main = is_main_process()
    directory = store.directory(kind, key)
    announced = -math.inf
    while True:
        finished, lock, holder = None, None, ""
        if main:
            finished = store.finished(name, kind, key)
            if finished is None:
                lock = locks.StageLock.try_acquire(directory)
                if lock is None:
                    holder = locks.holder(directory) or "another pipeline"
                else:
                    finished = store.finished(name, kind, key, warn=False)  # finished between our look and our lock
                    if finished is not None:
                        lock.release()
                        lock = None
                    else:  # ours to produce: what a killed attempt was writing goes
                        swept = remove_interrupted_writes(directory) if directory.is_dir() else []
                        if swept:
                            logger.info("stage %s: removed %d temporary file(s) of writes a stopped attempt left in %s",
                                        name, len(swept), directory)
        finished, waiting = broadcast_object((finished, bool(holder)))
        if not waiting:
            return finished, lock
        if main and time.monotonic() - announced > 600:
            logger.warning("stage %s: its output %s is being produced by %s; waiting to reuse it", name, directory, holder)
            announced = time.monotonic()
        time.sleep(POLL_S)


@contextlib.contextmanager
def _releasing(lock: locks.StageLock | None):
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _run_pipeline(config: PipelineConfig, device: torch.device, progress: Progress | None) -> PipelineResult:
    problem = config.batch_split_problem(rank_and_world_size()[1])
    if problem:
        raise ValueError(f"pipeline {config.name!r}: {problem}")
    torch.manual_seed(config.seed)
    output_dir = _absolute(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_shared_directory(output_dir)
    bundle = _build_dataset_checked_per_node(config)
    _check_stage_data(config, bundle)
    _verify_evaluation_images(config, bundle, output_dir)
    fingerprint = bundle.train.fingerprint()
    identity = data_identity(config, bundle)
    init_weights = _resolve_init_weights(config)
    store = Store(output_dir)
    main = is_main_process()
    tracker = Tracker(config.tracking, output_dir) if main else NullTracker(config.tracking, output_dir)
    progress = progress or Progress(enabled=config.progress and main)
    version = code_version()
    # Where this process runs (versions, processor, threads, GPU), on the pipeline run and each stage run it logs.
    env_tags = environment_tags(runtime_environment(device))
    pipeline_tags = {**env_tags, TAG_PIPELINE: config.name, TAG_CODE_VERSION: version, "ltscale.result_stage": config.result}
    # The seed is in the run's name because a sweep's runs are otherwise the same name in a row
    # of the MLflow UI; the pipeline tag stays the bare name, for grouping and look-ups.
    run_name = f"{config.name} seed {config.seed}"
    with tracker.pipeline_run(run_name, flatten_config(config), pipeline_tags) as parent:
        counts = bundle.train.class_counts()
        parent.log_dataset(bundle.name, fingerprint, config.data.root or "generated", "training", len(bundle.train),
                           extra={"class_counts": counts.tolist(), "num_classes": int(bundle.num_classes)})
        result = PipelineResult(config.name, parent.run_id, tracker.tracking_uri, config.result)
        for name, stage in config.stages.items():
            parents = {role: result.outputs[parent_name] for role, parent_name in stage_inputs(stage).items()}
            key = stage_key(stage, parents, identity, config, init_weights.get(name))
            tags = {
                **env_tags,
                TAG_PIPELINE: config.name,
                TAG_CONFIG_HASH: key,
                TAG_CODE_VERSION: version,
                TAG_PARENT_RUNS: join_run_ids([p.run_id for p in parents.values() if p.run_id]),
                TAG_OUTPUT: str(store.directory(stage.kind, key)),
                "ltscale.stage_kind": stage.kind,
            }
            if name in init_weights:
                tags["ltscale.init_weights"] = init_weights[name].identity
            params = flatten_config(stage) | {f"input.{role}": f"{p.name}:{p.key}" for role, p in parents.items()}
            finished, lock = _finished_or_claimed(store, name, stage.kind, key)
            with _releasing(lock), tracker.stage_run(name, params, tags) as run:
                run.log_dataset(bundle.name, fingerprint, config.data.root or "generated", "training", len(bundle.train))
                if finished is not None:
                    progress.note(f"{name}: reused {finished.directory}{_top1(finished.manifest.get('metrics', {}))}")
                    produced_with = finished.manifest.get("code_version")
                    run.set_tags({TAG_CACHED: "true", TAG_PRODUCED_BY: finished.run_id,
                                  **({TAG_PRODUCED_WITH_CODE: produced_with} if produced_with else {})})
                    if finished.manifest.get("metrics"):
                        run.log_metrics(finished.manifest["metrics"])
                    finished.name = name
                    result.outputs[name] = finished
                    result.cached.append(name)
                    continue
                ctx = StageContext(name=name, bundle=bundle, device=device, precision=config.precision, seed=config.seed,
                                   loader_config=config.data.loader, directory=store.directory(stage.kind, key), run=run,
                                   progress=progress, step=config.step, deepspeed=config.deepspeed,
                                   init_weights=init_weights.get(name))
                ctx.directory.mkdir(parents=True, exist_ok=True)
                run.log_dict(_stage_record(name, stage, parents, key, version), "stage_config.json")
                # A stage's random start (fresh weights, a re-initialised head, MoCo's first queue) comes
                # from its key, not from what ran before it in this process: the same key gives the
                # same output whether its parents were trained just now, reused, or resumed.
                torch.manual_seed(stage_seed(key))
                started = time.monotonic()
                progress.note(f"{name}: {stage.kind} stage started ({ctx.directory})")
                try:
                    files = RUNNERS[stage.kind](stage, ctx, parents)
                except BaseException:
                    ctx.record.discard()  # nothing of a failed stage is sent; its kept figures are closed
                    raise
                finally:
                    ctx.close()
                progress.note(f"{name}: finished in {_duration(time.monotonic() - started)}{_top1(ctx.metrics)}")
                manifest = {
                    "stage": name, "config": dataclasses.asdict(stage), "run_id": run.run_id, "pipeline": config.name,
                    "parents": {role: {"stage": p.name, "key": p.key, "run_id": p.run_id} for role, p in parents.items()},
                    "data_fingerprint": fingerprint, "data_identity": identity, "code_version": version, "files": files, "metrics": ctx.metrics,
                    # Not in the key: how many processes finished the stage, and every count that
                    # trained some of its epochs (a resume may have changed it).
                    "world_size": rank_and_world_size()[1],
                    "world_sizes": list(ctx.world_sizes or (rank_and_world_size()[1],)),
                }
                # Rank 0 writes the manifest; the broadcast also holds the other ranks until it has.
                output = broadcast_object(store.finish(name, stage.kind, key, manifest) if main else None)
                _send_record(ctx, output)
                result.outputs[name] = output
                result.executed.append(name)
        final = result.metrics()
        parent.log_metrics({k: v for k, v in final.items() if k.startswith("test/")})
        for name, output in result.outputs.items():
            stage_metrics = output.manifest.get("metrics", {})
            parent.log_metrics({f"{name}/{k}": v for k, v in stage_metrics.items() if k.startswith("test/")})
        parent.log_dict({n: {"key": o.key, "run_id": o.run_id, "directory": str(o.directory),
                             "code_version": o.manifest.get("code_version")} for n, o in result.outputs.items()}, "lineage.json")
        behind = sorted({str(o.manifest.get("code_version")) for o in result.outputs.values()})
        if behind != [version]:  # a result partly computed by other code (reused outputs) says so
            parent.set_tags({TAG_PRODUCED_WITH_CODE: ",".join(behind)})
    result.run_id = broadcast_object(result.run_id)  # every rank reports rank 0's record
    return result


def _absolute(output_dir: str) -> Path:
    """``output_dir`` as an absolute path. Every path a pipeline records (the stage runs'
    ``ltscale.output``, ``lineage.json``, the stage records) derives from it: relative to a working
    directory no run records (the default ``runs``), none could be found from a shared tracking
    server or after a ``cd``. The store's keys are not paths, so ``runs`` and ``/abs/runs`` reuse
    each other's outputs."""
    return Path(output_dir).expanduser().resolve()


def _send_record(ctx: StageContext, output: StageOutput) -> None:
    """Send a finished stage's record (:class:`~ltscale.stages.context.StageRecord`) and manifest
    to its run: after the stage is stored, so a tracking store that fails here loses no work.
    Rank 0 alone records; the others learn whether it could and stop with it if not, rather than
    wait in the next stage's collectives until their timeout."""
    failure: BaseException | None = None
    try:
        ctx.record.send()  # (the other ranks' run handles record nothing)
        ctx.run.log_dict(output.manifest, "manifest.json")
    except Exception as error:  # noqa: BLE001 - raised below, on every rank
        failure = error
    if broadcast_object(failure is not None):
        if failure is not None:
            raise failure
        raise RuntimeError(f"stage {ctx.name}: rank 0 could not record the stage's results in MLflow (its log says "
                           f"why); the stage is stored in {output.directory}, and a rerun reuses it")


def _top1(metrics: dict[str, float]) -> str:
    return f", test top-1 {metrics['test/top1']:.2f}" if "test/top1" in metrics else ""


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _stage_record(name: str, stage: StageConfig, parents: dict[str, StageOutput], key: str, version: str) -> dict[str, Any]:
    return {
        "stage": name, "key": key, "code_version": version, "config": dataclasses.asdict(stage),
        "parents": {role: {"stage": p.name, "key": p.key, "run_id": p.run_id, "directory": str(p.directory)} for role, p in parents.items()},
    }
