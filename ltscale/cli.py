"""The ``ltscale`` command line: run recipes, inspect data, evaluate checkpoints, the demo.

    ltscale recipes                         list recipes
    ltscale run RECIPE [--set key=value]    run a pipeline (typed overrides, unknown keys rejected)
    ltscale run RECIPE --plan               what a run would reuse, resume or train, without running
    ltscale demo                            SSD, DiVE and CE on the generated dataset, with a table
    ltscale data stats DATASET ...          per-class counts, groups and totals as JSON
    ltscale data verify DATASET ...         decode every image file, list the unreadable ones
    ltscale evaluate CHECKPOINT ...         top-1/top-5, many/medium/few of a model checkpoint
    ltscale virtual CHECKPOINT ...          DiVE's virtual-example distribution and (T, p) choice
    ltscale runs                            recorded pipelines: status, time, top-1 / few, run ids
    ltscale store verify                    re-hash every finished stage output, list those that changed
    ltscale ui                              the MLflow UI over the local store
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import typing
from pathlib import Path
from typing import Sequence

from ltscale.config import ConfigError, apply_overrides, get_recipe, list_recipes, override_key
from ltscale.config.overrides import has_key, near_keys, suggest_keys
from ltscale.data.config import DataConfig, DatasetName

DEFAULT_OUTPUT = "runs"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def _common_run_arguments(parser: argparse.ArgumentParser, pipeline: bool = True) -> None:
    """``--set`` and ``--device``; with ``pipeline`` (commands that run stages and record them)
    also where outputs and the MLflow record go, and the progress switch."""
    # evaluate / virtual read only the recipe's data, device and precision (the checkpoint is the model)
    example = "stages.teacher.optim.lr=0.05" if pipeline else "data.root=/data/cifar-100-python.tar.gz; only data.*, device, precision"
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"typed override of the recipe config, e.g. {example} (repeatable)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default)")
    if pipeline:
        parser.add_argument("--output-dir", default=None, help=f"where stage outputs and the local MLflow store go (default: {DEFAULT_OUTPUT})")
        parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: a local sqlite store in the output dir)")
        parser.add_argument("--no-progress", action="store_true", help="no progress: no bars on a terminal, no stage and epoch lines elsewhere")
        parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                            help="an MLflow tag on the pipeline run, e.g. sweep=lr-0.05 (repeatable)")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=typing.get_args(DatasetName), metavar="dataset",
                        help=", ".join(typing.get_args(DatasetName)))
    parser.add_argument("--root", default="", help="CIFAR archive/folder, or the image root of the split lists")
    parser.add_argument("--imbalance-factor", type=float, default=100.0, help="CIFAR-LT imbalance factor (default 100)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other data config field, e.g. train_list=ImageNet_LT_train.txt or, as with `ltscale run`, "
                             "data.train_list=... (repeatable)")


def _data_config(args: argparse.Namespace) -> DataConfig:
    base = DataConfig()
    # `ltscale run` spells these keys data.<field>; the same spelling works here
    given = [item.removeprefix("data.") for item in args.overrides]
    overrides = [f"dataset={args.dataset}", f"root={args.root}", f"imbalance_factor={args.imbalance_factor}", *given]
    return apply_overrides(base, overrides)


def _pipeline_config(name: str, args: argparse.Namespace):
    config = get_recipe(name)
    overrides = list(args.overrides)
    flags = {"output_dir": ("--output-dir", getattr(args, "output_dir", None)),
             "tracking.tracking_uri": ("--tracking-uri", getattr(args, "tracking_uri", None)),
             "device": ("--device", args.device),
             "progress": ("--no-progress", "false" if getattr(args, "no_progress", False) else None)}
    given = set(map(override_key, overrides))
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key in given:  # the flag would win without a word: say which of the two to drop
            raise ConfigError(f"{flag} and --set {key}=... both set {key}: give one")
        overrides.append(f"{key}={value}")
    config = apply_overrides(config, overrides)
    if getattr(args, "tags", None):
        # Not through --set: a tag's value may hold the commas that separate a tuple's items there.
        try:
            tracking = dataclasses.replace(config.tracking, run_tags=(*config.tracking.run_tags, *args.tags))
        except ValueError as error:
            raise ConfigError(f"--tag: {error}") from None
        config = dataclasses.replace(config, tracking=tracking)
    return config


def _check_output_dir(config, create: bool) -> None:
    """Refuse an ``output_dir`` that cannot be a directory, naming it and what is in the way,
    before anything is loaded; with ``create``, make it (as the pipeline would) here, where a
    failure can still be reported as a config problem."""
    output_dir = Path(config.output_dir).expanduser()
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == output_dir else f"is under {existing}, which is a file"
        raise ConfigError(f"output_dir={config.output_dir!r} {where}, not a directory: choose another output_dir")
    if create:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"output_dir={config.output_dir!r}: cannot create the directory ({error.strerror or error}): "
                "choose another output_dir"
            ) from None


def cmd_recipes(args: argparse.Namespace) -> int:
    recipes = list_recipes()
    width = max(len(n) for n in recipes)
    shown = {name: description for name, description in recipes.items() if not args.filter or args.filter in name}
    if not shown:
        print(f"ltscale recipes: no recipe name contains {args.filter!r} (`ltscale recipes` lists all {len(recipes)})",
              file=sys.stderr)
        return 1
    for name, description in shown.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ltscale.stages.pipeline import run_pipeline
    from ltscale.report import print_results

    config = _pipeline_config(args.recipe, args)
    _check_output_dir(config, create=not args.plan)
    if args.plan:
        return _print_plan(config)
    result = run_pipeline(config)
    if _is_main():
        print_results([result])
    return 0


def _print_plan(config) -> int:
    from ltscale.stages.pipeline import plan_pipeline

    plans = plan_pipeline(config)
    actions = {"finished": "reuse", "busy": "wait", "partial": "resume", "new": "run"}
    print(f"{config.name}: output_dir {config.output_dir}")
    width = max(len(plan.name) for plan in plans)
    wanted = "deepspeed" if config.deepspeed.enabled else "plain"
    for plan in plans:
        inputs = ", ".join(f"{role}={stage}" for role, stage in plan.inputs.items()) or "-"
        print(f"  {plan.name:<{width}}  {actions[plan.state]:<6}  {plan.kind}-{plan.key}  <- {inputs}")
        if plan.state == "partial" and wanted not in plan.progress:
            print(f"  {'':<{width}}  its progress was saved {'without' if config.deepspeed.enabled else 'with'} DeepSpeed: "
                  f"it resumes only with --set deepspeed.enabled={str(not config.deepspeed.enabled).lower()}; "
                  "this run would stop there")
    return 0


def _is_main() -> bool:
    """Rank 0 of a multi-process launch (or the only process): the one that prints the report.
    The process group outlives the pipelines (ltscale/dist/runtime.py), so it still says."""
    from ltscale.dist.gather import is_main_process

    return is_main_process()


def cmd_demo(args: argparse.Namespace) -> int:
    from configs.demo import DEMO_METHODS
    from ltscale.report import print_results
    from ltscale.stages.pipeline import run_pipeline

    recipes = {f"demo/{method}": get_recipe(f"demo/{method}") for method in DEMO_METHODS}
    # One --set serves three recipes: a stages.<name>.… (or stages.*.…) key goes to those with such
    # a stage (the student's temperature to SSD and DiVE, not to CE), and must fit at least one.
    for item in args.overrides:
        if not any(_override_applies(item, recipe) for recipe in recipes.values()):
            near = {key for recipe in recipes.values() for key in near_keys(recipe, override_key(item))}
            raise ConfigError(f"--set {item}: no stage of {', '.join(recipes)} has that field "
                              f"(their stages: {sorted({s for r in recipes.values() for s in r.stages})})."
                              + suggest_keys(override_key(item), near))
    configs = []
    for name, recipe in recipes.items():  # every config checked before the first pipeline starts
        selected = [item for item in args.overrides if _override_applies(item, recipe)]
        try:
            configs.append(_pipeline_config(name, argparse.Namespace(**{**vars(args), "overrides": selected})))
        except (ConfigError, ValueError) as error:
            raise ConfigError(f"recipe {name}: {error}") from None
    results = []
    for config in configs:
        _check_output_dir(config, create=True)
        results.append(run_pipeline(config))
    if not _is_main():
        return 0
    from ltscale.tracking import redact_uri

    print_results(results, detail=True)
    print(f"\nMLflow record: {redact_uri(results[-1].tracking_uri)} (experiment {config.tracking.experiment!r})")
    if not args.tracking_uri:
        print(f"Open the UI with: ltscale ui --output-dir {config.output_dir}")
    return 0


def _override_applies(override: str, config) -> bool:
    """Whether ``config`` has what a ``stages.<name>.<field…>=value`` override names (any stage for
    ``stages.*``); other keys apply to every recipe (a misspelt one is then named by the override's
    own error, with suggestions)."""
    key = override_key(override)
    return not key.startswith("stages.") or has_key(config, key)


def cmd_data_stats(args: argparse.Namespace) -> int:
    from ltscale.data import build_dataset

    bundle = build_dataset(_data_config(args), check_files=False)
    print(json.dumps(bundle.stats(), indent=None if args.compact else 2))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from ltscale.data import FileSplit, build_dataset
    from ltscale.data.loaders.files import verify_images

    bundle = build_dataset(_data_config(args))
    bad: list[str] = []
    for split in (bundle.train, bundle.val, bundle.test):
        if isinstance(split, FileSplit):
            bad += verify_images(split, num_workers=args.workers)
    print(json.dumps({"dataset": bundle.name, "unreadable": bad}, indent=2))
    return 1 if bad else 0


def _check_against_manifest(path: Path) -> None:
    """A model file of a stage directory must still have the bytes its stage finished with (torch does
    not check a checkpoint's CRCs, so a damaged file can load and give wrong numbers)."""
    from ltscale.engine.checkpoint import CheckpointError, file_checksum
    from ltscale.stages.store import MANIFEST, ManifestError, read_manifest

    if not (path.parent / MANIFEST).is_file() or not path.is_file():
        return  # a checkpoint outside a store (copied elsewhere): nothing to compare with
    try:
        manifest = read_manifest(path.parent / MANIFEST)
    except ManifestError as error:
        raise CheckpointError(f"{path}: its stage's {error}; cannot check the file against it") from None
    roles = [role for role, name in manifest["files"].items() if name == path.name]
    if roles and manifest["checksums"][roles[0]] != file_checksum(path):
        raise CheckpointError(f"{path} does not match the checksum its stage's {MANIFEST} recorded: the file changed "
                              "after the stage finished (`ltscale store verify` lists such outputs; rerunning the "
                              "pipeline recomputes it once the manifest is deleted)")


def _model_and_data(args: argparse.Namespace):
    import torch

    from ltscale.data import build_dataset
    from ltscale.stages.context import load_model
    from ltscale.stages.pipeline import resolve_device

    # The checkpoint is the model and nothing is recorded: of the recipe, only the data, the device
    # and the precision are read. Any other --set would be accepted and change nothing.
    for override in args.overrides:
        key = override_key(override)
        if not (key.startswith("data.") or key in ("device", "precision")):
            instead = "; the sweep is --temperatures / --powers" if args.command == "virtual" else ""
            raise ConfigError(f"--set {key}: ltscale {args.command} reads only the recipe's data.*, device and precision "
                              f"(the checkpoint is the model, and nothing is recorded){instead}")
    config = _pipeline_config(args.recipe, args)
    device = resolve_device(config.device)
    network = load_model(Path(args.checkpoint), device)  # first: a file that is no checkpoint at all is named as such
    _check_against_manifest(Path(args.checkpoint))
    bundle = build_dataset(config.data)
    if bundle.num_classes != network.head_specs[network.predict_head].num_outputs:
        raise ConfigError(
            f"checkpoint {args.checkpoint} predicts {network.head_specs[network.predict_head].num_outputs} classes but "
            f"the dataset of recipe {args.recipe} has {bundle.num_classes}"
        )
    return config, device, network, bundle, torch


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ltscale.data import build_loader
    from ltscale.engine.evaluate import evaluate
    from ltscale.engine.trainer import autocast_dtype

    config, device, network, bundle, _ = _model_and_data(args)
    loader = build_loader(bundle.test, bundle, train=False, batch_size=512, loader=config.data.loader, device=device, seed=0)
    results = evaluate(network, loader, bundle.train.class_counts(), network.classifier_heads(), device,
                       autocast_dtype(config.precision, device))
    report = {head: result.metrics("test") for head, result in results.items()}
    print(json.dumps({"checkpoint": args.checkpoint, "predict_head": network.predict_head, "heads": report}, indent=2))
    return 0


def cmd_virtual(args: argparse.Namespace) -> int:
    from ltscale.data import build_loader
    from ltscale.engine.trainer import autocast_dtype
    from ltscale.stages.config import VirtualExamplesConfig
    from ltscale.stages.virtual_examples import sweep

    try:  # the virtual_examples stage's own checks, before the model and data are loaded
        VirtualExamplesConfig(temperatures=tuple(args.temperatures), powers=tuple(args.powers))
    except ValueError as error:
        raise ConfigError(f"--temperatures / --powers: {error}") from None
    config, device, network, bundle, _ = _model_and_data(args)
    loader = build_loader(bundle.train, bundle, train=False, batch_size=512, loader=config.data.loader, device=device, seed=0,
                          substitute=True)  # as training and the virtual_examples stage: a replaced file does not stop it
    chosen, rows = sweep(network, loader, device, autocast_dtype(config.precision, device), bundle.train.class_counts(),
                         args.temperatures, args.powers)
    for row in rows:
        if not args.full:
            row.pop("distribution")
    print(json.dumps({"chosen": {"temperature": chosen["temperature"], "power": chosen["power"]}, "sweep": rows}, indent=2))
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    """Reuse trusts a file whose size and time are unchanged; this reads every byte."""
    from ltscale.stages.store import MANIFEST, Store

    store = Store(Path(args.output_dir))
    if not store.root.is_dir():
        print(f"ltscale store verify: no stage store at {store.root}", file=sys.stderr)
        return 2
    found = store.verify()
    bad = [(directory, status) for directory, status in found if status not in ("ok", "unfinished")]
    for directory, status in found:
        print(f"{status:>10}  {directory}" if status in ("ok", "unfinished") else f"   CHANGED  {directory}: {status}")
    print(f"{len(found)} stage outputs: {sum(s == 'ok' for _, s in found)} ok, {sum(s == 'unfinished' for _, s in found)} "
          f"unfinished, {len(bad)} changed")
    if any(not status.startswith("unreadable manifest") for _, status in bad):
        print(f"A changed output is not recomputed while its files keep their size and time: delete its {MANIFEST} "
              "(its progress checkpoint stays, so the stage resumes or re-runs) or the whole directory.", file=sys.stderr)
    if any(status.startswith("unreadable manifest") for _, status in bad):
        print(f"An output whose {MANIFEST} is unreadable is not trusted: the next run of its pipeline resumes or "
              "re-runs that stage.", file=sys.stderr)
    return 1 if bad else 0


def cmd_runs(args: argparse.Namespace) -> int:
    """The pipelines recorded in an MLflow store, newest first (for clusters without the UI)."""
    import time

    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from ltscale.tracking import TAG_ERROR, TAG_PIPELINE, default_tracking_uri
    from ltscale.tracking.attempts import TAG_PID, Attempt
    from ltscale.tracking import redact_uri
    from ltscale.tracking.mlflow_tracker import check_server_answers, check_sqlite_store, check_uri_form, sqlite_file

    uri = args.tracking_uri or default_tracking_uri(Path(args.output_dir))
    check_uri_form(uri, "--tracking-uri")
    check_sqlite_store(uri)
    check_server_answers(uri)
    store = sqlite_file(uri)
    if store is not None and not store.is_file():
        print(f"ltscale runs: no MLflow store at {store} (run a pipeline first, or pass --output-dir)", file=sys.stderr)
        return 2
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"ltscale runs: no experiment {args.experiment!r} at {redact_uri(uri)}", file=sys.stderr)
        return 2
    runs = [run for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                              max_results=max(args.limit * 20, 200))
            if TAG_PIPELINE in run.data.tags and MLFLOW_PARENT_RUN_ID not in run.data.tags][: args.limit]
    if not runs:
        print(f"no pipelines recorded in experiment {args.experiment!r} at {redact_uri(uri)}")
        return 0
    print(f"{'started':<16}  {'pipeline':<28} {'seed':>4}  {'status':<8} {'time':>8}  {'top1':>6} {'few':>6}  run id")
    here = Attempt.current()
    for run in runs:
        info, data = run.info, run.data
        # A RUNNING run whose process is certainly gone (killed outright) is marked KILLED by the next
        # pipeline; until then say so here rather than show it running, with a growing time.
        gone = here.owner_gone(data.tags) if info.status == "RUNNING" and TAG_PID in data.tags else None
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000))
        seconds = ((info.end_time or time.time() * 1000) - info.start_time) / 1000
        duration = _duration(seconds)
        metric = lambda name: f"{data.metrics[name]:.2f}" if name in data.metrics else "-"  # noqa: E731
        status = "GONE" if gone else info.status
        if gone:
            duration = "-"
        print(f"{started:<16}  {data.tags[TAG_PIPELINE]:<28} {data.params.get('seed', '-'):>4}  {status:<8} "
              f"{duration:>8}  {metric('test/top1'):>6} {metric('test/few'):>6}  {info.run_id}")
        if info.status in ("FAILED", "KILLED") and TAG_ERROR in data.tags:
            print(f"{'':<18}{data.tags[TAG_ERROR][:200]}")
        elif gone:
            print(f"{'':<18}recorded as RUNNING, but {gone}; the next pipeline on this store marks it KILLED")
        elif info.status == "RUNNING":
            now = _running_stage(client, experiment.experiment_id, info.run_id)
            if now:
                print(f"{'':<18}{now}")
    return 0


def _running_stage(client, experiment_id: str, parent_id: str) -> str:
    """Where a running pipeline is: its running stage and the last epoch that stage logged."""
    from ltscale.tracking import TAG_STAGE

    children = client.search_runs([experiment_id], max_results=5, filter_string=(
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"))
    if not children:
        return ""
    child = children[0]
    stage = child.data.tags.get(TAG_STAGE, child.info.run_name)
    history = client.get_metric_history(child.info.run_id, "train/loss")
    if not history:
        return f"now: {stage}"
    last = max(history, key=lambda point: point.step)
    epochs = child.data.params.get("optim.epochs")
    line = f"now: {stage}, epoch {last.step + 1}{f'/{epochs}' if epochs else ''} done (train loss {last.value:.4f})"
    # The recent pace, not the mean since the start: a run resumed on other hardware, or sharing
    # its machine differently now, goes at its present speed.
    recent = sorted(client.get_metric_history(child.info.run_id, "train/epoch_seconds"), key=lambda point: point.step)[-5:]
    left = int(epochs) - (last.step + 1) if epochs and epochs.isdigit() else 0
    if recent and left > 0:
        pace = statistics.median(point.value for point in recent)
        line += f"; {_duration(left * pace)} left at {pace:.0f} s per epoch"
    return line


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} m"


def cmd_ui(args: argparse.Namespace) -> int:
    from ltscale.tracking import ui

    if not Path(args.output_dir).is_dir():  # a mistyped path would get a new, empty store
        raise ConfigError(f"--output-dir {args.output_dir}: no such directory (a pipeline records its runs in "
                          f"<output_dir>/mlflow.db; pass the --output-dir it ran with, default {DEFAULT_OUTPUT})")
    from ltscale.tracking.mlflow_tracker import check_sqlite_store, default_tracking_uri

    check_sqlite_store(default_tracking_uri(Path(args.output_dir)))
    return ui(Path(args.output_dir), port=args.port)


def _count(text: str) -> int:
    """argparse type of a count: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _positive_count(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltscale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list recipes")
    p.add_argument("filter", nargs="?", default="", help="only names containing this")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("run", help="run a recipe's pipeline")
    p.add_argument("recipe")
    _common_run_arguments(p)
    p.add_argument("--plan", action="store_true",
                   help="print each stage's output key and whether it would be reused, resumed or trained; run nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="SSD, DiVE and CE on the generated long-tailed dataset (CPU minutes)")
    _common_run_arguments(p)
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="dataset statistics and checks").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("stats", help="per-class training counts, many/medium/few groups and totals as JSON")
    _data_arguments(p)
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("verify", help="decode every image file and list the unreadable ones")
    _data_arguments(p)
    p.add_argument("--workers", type=_count, default=4, help="decoding processes (default 4; 0: in this process)")
    p.set_defaults(func=cmd_data_verify)

    store = sub.add_parser("store", help="the stage store").add_subparsers(dest="store_command", required=True)
    p = store.add_parser("verify", help="re-hash every finished stage output and list those that changed")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"whose store (default: {DEFAULT_OUTPUT})")
    p.set_defaults(func=cmd_store_verify)

    for name, func, text in (("evaluate", cmd_evaluate, "evaluate a model checkpoint on a recipe's test set"),
                             ("virtual", cmd_virtual, "virtual-example distribution of a teacher checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("checkpoint", help="a model.pt written by a stage")
        p.add_argument("--recipe", required=True, help="the recipe whose data the checkpoint is evaluated on")
        _common_run_arguments(p, pipeline=False)  # prints JSON; records nothing, writes nothing
        if name == "virtual":
            p.add_argument("--temperatures", type=float, nargs="+", default=[float(t) for t in range(1, 11)])
            p.add_argument("--powers", type=float, nargs="+", default=[1.0, 0.5])
            p.add_argument("--full", action="store_true", help="include the per-class distributions")
        p.set_defaults(func=func)

    p = sub.add_parser("runs", help="the pipelines recorded in the MLflow store: status, time, top-1 / few")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"whose local store to read (default: {DEFAULT_OUTPUT})")
    p.add_argument("--tracking-uri", default=None, help="an MLflow URI instead of the local store")
    p.add_argument("--experiment", default="ltscale", help="MLflow experiment (default: ltscale)")
    p.add_argument("--limit", type=_positive_count, default=20, help="newest N pipelines (default 20)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("ui", help="open the MLflow UI on the local store")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (``kill``, ``timeout``, ``docker stop``, a scheduler's preemption without submitit)
    ends the run as Ctrl-C does: the MLflow runs are marked KILLED, the stage lock released, and
    the exit status is 143. Only where nobody else handles SIGTERM (submitit installs its own)."""
    import signal

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminated)


def _store_refused(error: BaseException) -> bool:
    """A store that answered "no" (an unsupported URI, its file store switched off, a bad value):
    waiting for it to come back will not help, unlike a store that does not answer."""
    code = getattr(error, "error_code", "")
    return type(error).__module__.startswith("mlflow") and code in ("INVALID_PARAMETER_VALUE", "PERMISSION_DENIED",
                                                                      "UNAUTHENTICATED", "BAD_REQUEST")


def _from_the_tracking_store(error: BaseException) -> bool:
    """An error raised by MLflow or the stack under it (the store is down, refuses a call, or its
    database is damaged)."""
    return type(error).__module__.split(".")[0] in ("mlflow", "requests", "urllib3", "sqlalchemy", "sqlite3")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ltscale.data.errors import DatasetError
    from ltscale.dist.runtime import DistributedEnvError
    from ltscale.engine.checkpoint import CheckpointError
    from ltscale.tracking import redact_uri  # errors may quote a tracking URI with its password

    if args.func in (cmd_run, cmd_demo):
        _terminate_like_ctrl_c()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, CheckpointError, DistributedEnvError) as error:
        print(f"ltscale: error: {redact_uri(str(error))}", file=sys.stderr)
        return 2
    except ValueError as error:  # config validation (__post_init__) raises ValueError with the fix
        print(f"ltscale: error: {redact_uri(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:
        if not _from_the_tracking_store(error):
            raise
        # MLflow's first line carries the fix (a scheme it supports, MLFLOW_ALLOW_FILE_STORE...):
        # kept whole, cut only where a proxy's HTML page would follow.
        first = (redact_uri(str(error)).strip().splitlines() or [type(error).__name__])[0][:2000]
        if _store_refused(error):
            print(f"ltscale: error: the MLflow tracking store refused the request: {first}", file=sys.stderr)
        elif args.func in (cmd_run, cmd_demo):
            print(f"ltscale: error: the MLflow tracking store failed: {first}. Finished stages "
                  "and the training progress are kept: rerun the same command once the store answers to resume",
                  file=sys.stderr)
        else:
            print(f"ltscale: error: the MLflow tracking store failed: {first}", file=sys.stderr)
        return 1
    except SystemExit as exit:
        if exit.code == 128 + 15 and args.func in (cmd_run, cmd_demo) and _is_main():  # _terminate_like_ctrl_c
            print("ltscale: terminated (SIGTERM); finished stages are kept, and rerunning the same command reuses "
                  "them and resumes an interrupted training stage from its last completed epoch", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        if not _is_main():
            return INTERRUPTED_EXIT  # every rank gets the Ctrl-C; one line is enough
        # Finished stages have their outputs and manifests on disk, and a training stage writes its
        # progress checkpoint atomically after every epoch (ltscale/engine/trainer.py), so the same
        # command picks up where this one stopped; a traceback would only hide that.
        if args.func in (cmd_run, cmd_demo):
            print("ltscale: interrupted; finished stages are kept, and rerunning the same command reuses them and "
                  "resumes an interrupted training stage from its last completed epoch", file=sys.stderr)
        else:
            print("ltscale: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
