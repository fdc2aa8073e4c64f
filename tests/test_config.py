"""Typed configs: dotted overrides, validation, the recipe registry, hashing, and lr schedules.

The CIFAR recipe checks pin the paper settings listed in ``METHODS.md`` (ResNet-32, 200 epochs,
batch 128, SGD 0.1 / wd 2e-4, 5 warm-up epochs, x0.01 at 160 and x1e-4 at 180; LWS 5 epochs,
lr 0.2, batch 512, class-balanced; DiVE T = 3, p = 0.5, alpha = 0.5; SSD T = 2, rotation weight 1).

Run:  python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from typing import Literal, Optional

import numpy as np
import pytest

from ltscale.config import ConfigError, apply_overrides, config_hash, config_to_dict, flatten_config, get_recipe, list_recipes
from ltscale.config.overrides import parse_value
from ltscale.engine.schedule import OptimConfig, lr_schedule
from ltscale.stages.config import (
    DistillConfig,
    EvaluateConfig,
    PipelineConfig,
    RebalanceConfig,
    SoftLabelsConfig,
    TeacherConfig,
    VirtualExamplesConfig,
)

SSD = "cifar100-lt-if100/ssd"


@pytest.fixture
def ssd():
    return get_recipe(SSD)


# ---- typed overrides ---------------------------------------------------------------------------


def test_overrides_parse_each_field_type(ssd):
    config = apply_overrides(
        ssd,
        [
            "seed=3",  # int
            "stages.teacher.optim.lr=0.05",  # float, nested in a named stage
            "stages.teacher.optim.weight_decay=5e-4",
            "progress=false",  # bool
            "stages.teacher.optim.nesterov=yes",
            "precision=bf16",  # Literal
            "stages.teacher.optim.milestones=(120, 160)",  # tuple[int, ...]
            "stages.teacher.optim.decay_factors=0.1,0.01",  # tuple[float, ...] without brackets
            "tracking.tracking_uri=http://127.0.0.1:5000/a=b",  # only the first '=' splits
            "data.root=/data/cifar-100-python.tar.gz",
        ],
    )
    teacher = config.stages["teacher"]
    assert config.seed == 3 and type(config.seed) is int
    assert teacher.optim.lr == 0.05 and type(teacher.optim.lr) is float
    assert teacher.optim.weight_decay == 5e-4
    assert config.progress is False and teacher.optim.nesterov is True
    assert config.precision == "bf16"
    assert teacher.optim.milestones == (120, 160) and all(type(m) is int for m in teacher.optim.milestones)
    assert teacher.optim.decay_factors == (0.1, 0.01)
    assert config.tracking.tracking_uri == "http://127.0.0.1:5000/a=b"
    assert config.data.root == "/data/cifar-100-python.tar.gz"
    # only the named stage changed; the student keeps its own optimiser
    assert config.stages["student"].optim.lr == 0.1 and config.stages["student"].optim.milestones == (160, 180)


def test_a_float_field_accepts_an_integer_literal(ssd):
    config = apply_overrides(ssd, ["stages.teacher.optim.lr=1"])
    assert config.stages["teacher"].optim.lr == 1.0 and type(config.stages["teacher"].optim.lr) is float


def test_overrides_do_not_mutate_the_input(ssd):
    before = config_hash(ssd)
    apply_overrides(ssd, ["stages.teacher.optim.lr=0.05", "seed=4"])
    assert ssd.stages["teacher"].optim.lr == 0.1 and ssd.seed == 0
    assert config_hash(ssd) == before


def test_optional_and_union_annotations():
    assert parse_value("none", Optional[int], "k") is None
    assert parse_value("null", int | None, "k") is None
    assert parse_value("7", Optional[int], "k") == 7
    assert parse_value("2.5", float | None, "k") == 2.5
    with pytest.raises(ConfigError, match=r"override k='x'"):
        parse_value("x", Optional[int], "k")

    @dataclasses.dataclass(frozen=True)
    class Toy:
        limit: Optional[int] = 3
        mode: Literal["a", "b"] = "a"

    assert apply_overrides(Toy(), ["limit=None"]).limit is None
    assert apply_overrides(Toy(), ["limit=12"]).limit == 12


@pytest.mark.parametrize(("value", "message"), [
    ("[[120,160]]", "lists do not nest"),
    ("120,,160", "an empty element between commas"),
    ("[120,160", "'[' is not closed by ']'"),
])
def test_malformed_lists_are_refused_not_guessed(ssd, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(ssd, [f"stages.teacher.optim.milestones={value}"])
    fine = apply_overrides(ssd, ["stages.teacher.optim.milestones=[120, 160,]"])  # a trailing comma, as in Python
    assert fine.stages["teacher"].optim.milestones == (120, 160)


@pytest.mark.parametrize(
    ("override", "bad_value", "expected_type"),
    [
        ("seed=abc", "abc", "int"),
        ("seed=1.5", "1.5", "int"),
        ("stages.teacher.optim.lr=fast", "fast", "float"),
        ("stages.teacher.optim.milestones=(120,x)", "x", "int"),  # the offending element is quoted
        ("progress=maybe", "maybe", "boolean"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(ssd, override, bad_value, expected_type):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as error:
        apply_overrides(ssd, [override])
    message = str(error.value)
    assert f"override {key}={bad_value!r}" in message, message
    assert re.search(rf"\b{expected_type}\b", message), message


def test_literal_choices_are_listed(ssd):
    with pytest.raises(ConfigError, match=r"precision='fp64': expected one of 'auto', 'fp32', 'bf16'") as error:
        apply_overrides(ssd, ["precision=fp64"])
    assert "precision" in str(error.value)
    with pytest.raises(ConfigError, match=r"'lws', 'crt', 'tau_norm'.*Did you mean 'tau_norm'"):
        apply_overrides(ssd, ["stages.teacher_lws.method=tau-norm"])


def test_unknown_field_suggests_a_close_match(ssd):
    with pytest.raises(ConfigError) as error:
        apply_overrides(ssd, ["stages.teacher.optim.lrr=0.1"])
    message = str(error.value)
    assert "unknown key 'stages.teacher.optim.lrr'" in message
    assert "OptimConfig has no field 'lrr'" in message
    assert "Did you mean 'lr'" in message


def test_unknown_stage_suggests_a_close_match(ssd):
    with pytest.raises(ConfigError, match=r"unknown key 'stages.teachr.optim.lr'.*Did you mean 'teacher'"):
        apply_overrides(ssd, ["stages.teachr.optim.lr=0.1"])


def test_key_below_a_leaf_and_whole_sections_are_rejected(ssd):
    with pytest.raises(ConfigError, match=r"unknown key 'seed.value'"):
        apply_overrides(ssd, ["seed.value=1"])
    with pytest.raises(ConfigError, match=r"'stages.teacher.optim' names a whole section"):
        apply_overrides(ssd, ["stages.teacher.optim=1"])
    with pytest.raises(ConfigError, match=r"'stages.teacher' names a whole section"):
        apply_overrides(ssd, ["stages.teacher=x"])


def test_a_star_sets_the_field_in_every_stage_that_has_it(ssd):
    config = apply_overrides(ssd, ["stages.*.optim.epochs=190", "stages.*.model.init_from=/w/r32.pth"])
    trained = [name for name, stage in ssd.stages.items() if hasattr(stage, "optim")]
    assert trained == ["teacher", "teacher_lws", "student", "student_lws"]
    assert all(config.stages[name].optim.epochs == 190 for name in trained)
    assert config.stages["soft_labels"] == ssd.stages["soft_labels"]  # no optim: untouched
    assert {name for name, stage in config.stages.items() if getattr(getattr(stage, "model", None), "init_from", "")} == {"teacher", "student"}
    assert ssd.stages["teacher"].optim.epochs == 200  # the input is not mutated
    with pytest.raises(ConfigError, match=r"unknown key 'stages.\*.optim.epoch': none of .* has 'optim.epoch'\. "
                                          r"Did you mean 'stages.\*.optim.epochs', 'stages.\*.optim.warmup_epochs'\?"):
        apply_overrides(ssd, ["stages.*.optim.epoch=3"])
    with pytest.raises(ConfigError, match=r"has 'optm.lr'\. Did you mean 'stages.\*.optim.lr'\?"):  # the misspelt name need not be the last
        apply_overrides(ssd, ["stages.*.optm.lr=0.1"])
    # Each stage offers its own near fields; the closest comes first, not the alphabetically first.
    with pytest.raises(ConfigError, match=r"Did you mean 'stages.\*.soft_weight', "):
        apply_overrides(ssd, ["stages.*.soft_weigh=1"])
    with pytest.raises(ConfigError, match=r"override stages.\*.optim.epochs='x': expected int"):
        apply_overrides(ssd, ["stages.*.optim.epochs=x"])
    with pytest.raises(ConfigError, match="names whole sections"):
        apply_overrides(ssd, ["stages.*=x"])
    # A check that fails after the overrides names the stage it failed in.
    with pytest.raises(ConfigError, match=r"^stages.teacher.optim: optim.warmup_epochs \(5\) must be in \[0, optim.epochs=3\)"):
        apply_overrides(ssd, ["stages.*.optim.epochs=3"])


def test_malformed_overrides_are_rejected(ssd):
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        apply_overrides(ssd, ["seed"])
    with pytest.raises(ConfigError, match=r"empty key"):
        apply_overrides(ssd, ["=3"])


def test_validation_reruns_after_an_override(ssd):
    with pytest.raises(ValueError, match=r"optim.epochs must be >= 1, got 0"):
        apply_overrides(ssd, ["stages.teacher.optim.epochs=0"])
    with pytest.raises(ValueError, match=r"optim.warmup_epochs \(5\) must be in \[0, optim.epochs=5\)"):
        apply_overrides(ssd, ["stages.teacher.optim.epochs=5"])
    with pytest.raises(ValueError, match=r"same length"):
        apply_overrides(ssd, ["stages.teacher.optim.milestones=100"])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        apply_overrides(get_recipe("cifar100-lt-if100/dive"), ["stages.student.alpha=1.5"])
    # a cross-field check of the enclosing stage (LDAM needs the cosine head)
    with pytest.raises(ValueError, match=r"loss.kind=ldam expects model.classifier=cosine"):
        apply_overrides(ssd, ["stages.teacher.loss.kind=ldam"])
    # ...and overrides applied in order can make it valid again
    ce = get_recipe("cifar100-lt-if100/ce")
    fixed = apply_overrides(ce, ["stages.teacher.model.classifier=cosine", "stages.teacher.loss.kind=ldam"])
    assert fixed.stages["teacher"].loss.kind == "ldam"
    # (in SSD the LDAM teacher's cosine head would then reach LWS, which the pipeline refuses)
    with pytest.raises(ValueError, match=r"stage 'teacher_lws' \(method=lws\) rescales a linear classifier's weights, "
                                         r"but head 'cls' of 'teacher' is a cosine head; method=crt"):
        apply_overrides(ssd, ["stages.teacher.model.classifier=cosine", "stages.teacher.loss.kind=ldam"])


def _ldam_teacher_then(consumer_name: str, consumer) -> PipelineConfig:
    ce = get_recipe("cifar100-lt-if100/ce")
    teacher = apply_overrides(ce, ["stages.teacher.model.classifier=cosine", "stages.teacher.loss.kind=ldam"]).stages["teacher"]
    return dataclasses.replace(ce, stages={"teacher": teacher, consumer_name: consumer})


@pytest.mark.parametrize(("consumer", "message"), [
    (SoftLabelsConfig(source="teacher"), r"stage 'c' stores a model's logits, but its source 'teacher' predicts with a "
                                         r"cosine \(LDAM\) head, whose logits are unscaled cosines; re-balance it with method=crt"),
    (VirtualExamplesConfig(source="teacher"), r"measures a teacher model's virtual examples, but its source 'teacher' predicts"),
    (DistillConfig(method="dive", teacher="teacher", power=0.5), r"\(method=dive\) distils .* but its teacher 'teacher' predicts"),
    (DistillConfig(method="ssd", teacher="teacher"), r"\(method=ssd\) distils .* but its teacher 'teacher' predicts"),
    (RebalanceConfig(method="tau_norm", source="teacher"), r"\(method=tau_norm\) rescales a linear classifier's weights"),
])
def test_an_ldam_cosine_head_is_refused_where_its_logits_or_weights_would_be_used(consumer, message):
    with pytest.raises(ValueError, match=message):
        _ldam_teacher_then("c", consumer)


def test_an_ldam_teacher_re_balanced_by_crt_feeds_later_stages():
    pipeline = _ldam_teacher_then("crt", RebalanceConfig(method="crt", source="teacher"))
    stages = {**pipeline.stages, "lws": RebalanceConfig(method="lws", source="crt"),  # cRT left a linear head
              "labels": SoftLabelsConfig(source="lws"), "evaluate": EvaluateConfig(source="teacher")}
    assert list(dataclasses.replace(pipeline, stages=stages).stages) == ["teacher", "crt", "lws", "labels", "evaluate"]


@pytest.mark.parametrize(("fields", "message"), [
    (dict(method="ssd", power=0.5), r"power=0.5 is DiVE's power normalisation \(method=dive\); method=ssd distils with plain KD"),
    (dict(method="ssd", alpha=0.3), r"alpha=0.3 weighs DiVE's two terms \(method=dive\); method=ssd weighs its heads with"),
    (dict(method="dive", hard_weight=2.0), r"hard_weight / soft_weight \(2 / 1\) weigh SSD's two heads \(method=ssd\); method=dive"),
    (dict(method="dive", soft_weight=0.5), r"hard_weight / soft_weight \(1 / 0.5\)"),
])
def test_a_distillation_setting_of_the_other_method_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**fields)


def test_ssd_takes_a_temperature_only_from_a_sweep_without_power_normalisation(ssd):
    stages = dict(ssd.stages)
    names = list(stages)
    student = names.index("student")
    with_sweep = {**{n: stages[n] for n in names[:student]}, "ve": VirtualExamplesConfig(source="teacher_lws"),
                  **{n: stages[n] for n in names[student:]}}
    with_sweep["student"] = dataclasses.replace(stages["student"], temperature_from="ve")
    with pytest.raises(ValueError, match=r"stage 'student' \(method=ssd\) distils with plain KD \(p = 1\), but its "
                                         r"temperature_from 've' may choose a power from \(1.0, 0.5\); set stages.ve.powers=\[1.0\]"):
        dataclasses.replace(ssd, stages=with_sweep)
    with_sweep["ve"] = VirtualExamplesConfig(source="teacher_lws", powers=(1.0,))
    assert dataclasses.replace(ssd, stages=with_sweep).stages["student"].temperature_from == "ve"


def test_a_temperature_must_come_from_the_distilled_teachers_own_virtual_examples(ssd):
    dive = get_recipe("demo/dive")
    with pytest.raises(ValueError, match=r"stage 'student' distils 'teacher', but its temperature_from 'virtual_examples' "
                                         r"measures the virtual examples of 'other'; set stages.virtual_examples.source=teacher"):
        PipelineConfig(
            name="x", data=dive.data,
            stages={"teacher": dive.stages["teacher"], "other": dive.stages["teacher"],
                    "virtual_examples": VirtualExamplesConfig(source="other"),
                    "student": dataclasses.replace(dive.stages["student"], temperature_from="virtual_examples")})
    assert apply_overrides(dive, ["stages.student.temperature_from=virtual_examples"])  # its own teacher: accepted
    # SSD's student distils the soft labels, so the sweep must measure the model they were computed from.
    stages = dict(ssd.stages)
    names = list(stages)
    student = names.index("student")
    with_sweep = {**{n: stages[n] for n in names[:student]}, "ve": VirtualExamplesConfig(source="teacher", powers=(1.0,)),
                  **{n: stages[n] for n in names[student:]}}
    with_sweep["student"] = dataclasses.replace(stages["student"], temperature_from="ve")
    with pytest.raises(ValueError, match=r"stage 'student' distils 'teacher_lws' \(through 'soft_labels'\), but its "
                                         r"temperature_from 've' measures the virtual examples of 'teacher'; "
                                         r"set stages.ve.source=teacher_lws"):
        dataclasses.replace(ssd, stages=with_sweep)


@pytest.mark.parametrize("recipe, override, message", [
    ("demo/ce", "data.root=/data/cifar-100-python.tar.gz", r"data.dataset=synthetic does not read data.root \(the images are generated"),
    ("demo/ce", "data.train_list=train.txt", r"does not read data.train_list"),
    ("demo/ce", "data.imbalance_factor=10", r"data.imbalance_factor \(the generated set's is data.synthetic.imbalance_factor\)"),
    ("demo/ce", "data.image_size=32", r"data.image_size \(the generated set's is data.synthetic.image_size\)"),
    ("cifar100-lt-if100/ce", "data.test_list=test.txt", r"data.dataset=cifar100_lt does not read data.test_list"),
    ("cifar100-lt-if100/ce", "data.train_list=train.txt", r"data.dataset=cifar100_lt does not read data.train_list"),
    ("cifar100-lt-if100/ce", "data.image_size=64", r"data.image_size \(CIFAR images are 32 px"),
    ("cifar100-lt-if100/ce", "data.synthetic.num_classes=10", r"data.synthetic.\* \(that is the generated set's config\)"),
    ("imagenet-lt/ce", "data.imbalance_factor=50", r"data.imbalance_factor \(the imagenet_lt split lists fix its imbalance"),
])
def test_a_data_setting_the_dataset_would_ignore_is_refused(recipe, override, message):
    # Silently dropped, it would make a run other than the one asked for (an archive path on the
    # generated set trains on generated images).
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe(recipe), [override])


@pytest.mark.parametrize("role", ["train", "test"])
def test_a_split_list_beside_an_annotation_file_is_refused(role):
    """The annotation file replaces the list: the list would be dropped without a word."""
    with pytest.raises(ValueError, match=rf"data.dataset=inat2018 does not read data.{role}_list when "
                                         rf"data.{role}_annotations is set \(the annotation file replaces the list"):
        apply_overrides(get_recipe("inat18/ce"), [f"data.{role}_list=l.txt", f"data.{role}_annotations=a.json"])
    apply_overrides(get_recipe("inat18/ce"), [f"data.{role}_annotations=a.json"])
    with pytest.raises(ValueError, match=rf"data.dataset=imagenet_lt does not read data.{role}_annotations \(iNaturalist 2018's"):
        apply_overrides(get_recipe("imagenet-lt/ce"), [f"data.{role}_annotations=a.json"])


def test_settings_every_dataset_reads_are_accepted():
    apply_overrides(get_recipe("cifar100-lt-if100/ce"), ["data.root=/x.tar.gz", "data.imbalance_factor=50"])
    apply_overrides(get_recipe("demo/ce"), ["data.synthetic.imbalance_factor=20", "data.loader.cutout=8"])
    apply_overrides(get_recipe("imagenet-lt/ce"), ["data.root=/x", "data.image_size=160", "data.val_list=v.txt"])
    # switching the dataset and giving its location together is one valid change
    apply_overrides(get_recipe("demo/ce"), ["data.dataset=cifar10_lt", "data.root=/x.tar.gz"])


# ---- pipeline DAG -----------------------------------------------------------------------------------


def test_a_stage_consuming_a_later_stage_is_rejected():
    with pytest.raises(ValueError, match=r"stage 'lws' consumes 'teacher' as its source, but that stage comes later"):
        PipelineConfig(name="bad", stages={"lws": RebalanceConfig(source="teacher"), "teacher": TeacherConfig()})


def test_a_stage_consuming_a_missing_stage_is_rejected():
    with pytest.raises(ValueError, match=r"stage 'student' consumes 'soft_labels' as its teacher, but that stage does not exist"):
        PipelineConfig(name="bad", stages={"teacher": TeacherConfig(), "student": DistillConfig(teacher="soft_labels")})
    with pytest.raises(ValueError, match=r"consumes 've' as its temperature, but that stage does not exist"):
        PipelineConfig(
            name="bad",
            stages={
                "teacher": TeacherConfig(),
                "student": DistillConfig(method="dive", teacher="teacher", temperature_from="ve"),
            },
        )


@pytest.mark.parametrize("override, message", [
    ("stages.student.temperature_from=teacher",
     "stage 'student' takes T and p from a virtual_examples stage, but its temperature_from 'teacher' produces a model"),
    ("stages.student.power=1,stages.student.method=ssd,stages.student.teacher=virtual_examples",
     "stage 'student' (method=ssd) distils stored soft labels or a teacher model run on each batch, but its teacher "
     "'virtual_examples' produces a virtual-example distribution"),
    ("stages.student.teacher=virtual_examples",
     "stage 'student' (method=dive) distils from a teacher model run on each batch, but its teacher 'virtual_examples' "
     "produces a virtual-example distribution"),
])
def test_a_stage_fed_the_wrong_kind_of_output_is_refused_before_anything_trains(override, message):
    dive = get_recipe("demo/dive")
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(dive, override.split(","))


def test_rebalancing_needs_a_model_and_one_of_its_classifier_heads():
    ssd = get_recipe("demo/ssd")
    with pytest.raises(ValueError, match=r"'student_lws' re-balances a classifier head \(method=lws\), but its source "
                                         r"'soft_labels' produces soft labels"):
        apply_overrides(ssd, ["stages.student_lws.source=soft_labels"])
    with pytest.raises(ValueError, match=r"re-balances head 'cls', but the model of 'student' has the classifier heads "
                                         r"\['hard', 'soft'\]"):
        apply_overrides(ssd, ["stages.student_lws.head=cls"])
    with pytest.raises(ValueError, match=r"re-balances head 'rotation', but the model of 'teacher' has the classifier heads \['cls'\]"):
        apply_overrides(ssd, ["stages.teacher_lws.head=rotation"])  # the rotation head is not a classifier
    assert apply_overrides(ssd, ["stages.student_lws.head=soft"]).stages["student_lws"].head == "soft"
    with pytest.raises(ValueError, match=r"stage 'lws' consumes 'lws' as its source, but that stage is this stage itself"):
        apply_overrides(get_recipe("demo/lws"), ["stages.lws.source=lws"])


def test_valid_dag_and_result_stage():
    stages = {
        "teacher": TeacherConfig(),
        "virtual_examples": VirtualExamplesConfig(source="teacher"),
        "lws": RebalanceConfig(source="teacher"),
        "soft_labels": SoftLabelsConfig(source="lws"),
        "student": DistillConfig(teacher="soft_labels"),
    }
    assert PipelineConfig(name="ok", stages=stages).result == "student"
    assert PipelineConfig(name="ok", stages=stages, result_stage="lws").result == "lws"
    with pytest.raises(ValueError, match=r"result_stage 'nope' is not one of the stages"):
        PipelineConfig(name="ok", stages=stages, result_stage="nope")
    with pytest.raises(ValueError, match=r"has no stages"):
        PipelineConfig(name="empty")


def test_dag_is_rechecked_after_an_override(ssd):
    with pytest.raises(ValueError, match=r"stage 'student' consumes 'student_lws' as its teacher, but that stage comes later"):
        apply_overrides(ssd, ["stages.student.teacher=student_lws"])
    with pytest.raises(ValueError, match=r"'techer' as its source, but that stage does not exist"):
        apply_overrides(ssd, ["stages.teacher_lws.source=techer"])


# ---- registry -----------------------------------------------------------------------------------------


def test_every_registered_recipe_builds():
    recipes = list_recipes()
    assert len(recipes) >= 80
    assert list(recipes) == sorted(recipes)
    for name, description in recipes.items():
        config = get_recipe(name)
        assert isinstance(config, PipelineConfig), name
        # the run is recorded under the name the user typed
        assert config.name == name, (name, config.name)
        assert description, name
        assert config.result in config.stages
        assert flatten_config(config)["name"] == name
        assert config_hash(config) == config_hash(get_recipe(name))


def test_paper_methods_are_registered_for_every_cifar100_imbalance():
    recipes = list_recipes()
    for imbalance in (100, 50, 10):
        for method in ("ce", "bsce", "ldam-drw", "crt", "lws", "tau-norm", "dive", "ssd", "ssd-dive"):
            assert f"cifar100-lt-if{imbalance}/{method}" in recipes


def test_ldam_drw_defers_re_weighting_to_two_thirds_of_every_schedule():
    drw = {name: (get_recipe(name).stages["teacher"].loss.drw_epoch, get_recipe(name).stages["teacher"].optim.epochs)
           for name in ("imagenet-lt/ldam-drw", "imagenet-lt-135ep/ldam-drw", "inat18/ldam-drw", "inat18-200ep/ldam-drw")}
    assert drw == {"imagenet-lt/ldam-drw": (60, 90), "imagenet-lt-135ep/ldam-drw": (90, 135),
                   "inat18/ldam-drw": (60, 90), "inat18-200ep/ldam-drw": (133, 200)}


def test_unknown_recipe_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown recipe 'cifar100-lt-if100/sdd'\. Did you mean .*'cifar100-lt-if100/ssd'"):
        get_recipe("cifar100-lt-if100/sdd")
    with pytest.raises(ConfigError, match=r"Run `ltscale recipes` to list all \d+"):
        get_recipe("zzzz")


def test_config_hash_is_stable_and_sensitive(ssd):
    base = config_hash(ssd)
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert config_hash(get_recipe(SSD)) == base
    assert config_hash(apply_overrides(ssd, ["stages.teacher.optim.lr=0.1"])) == base  # same value, same hash
    changed = {
        config_hash(apply_overrides(ssd, [override]))
        for override in ("stages.teacher.optim.lr=0.05", "stages.student.temperature=3", "seed=1", "data.imbalance_factor=50")
    }
    assert len(changed) == 4 and base not in changed
    assert config_hash(ssd, "parent") != base
    assert config_hash(ssd, "parent-a") != config_hash(ssd, "parent-b")
    assert len(config_hash(ssd, length=8)) == 8



def test_a_field_added_later_enters_the_key_only_when_set(ssd):
    """``keyed_when_set`` fields (added after stages were stored) leave the hash at their default,
    so stages stored before the field existed keep their keys; any other value is keyed."""
    from dataclasses import dataclass

    from ltscale.config.hashing import keyed_when_set
    from ltscale.stages.config import RebalanceConfig

    @dataclass(frozen=True)
    class Before:
        lr: float = 0.2

    @dataclass(frozen=True)
    class After:
        lr: float = 0.2
        mode: str = keyed_when_set("old")

    assert config_hash(After()) == config_hash(Before()) == config_hash({"lr": 0.2})
    assert config_hash(After(mode="new")) != config_hash(Before())
    assert config_hash(After(lr=0.3)) == config_hash(Before(lr=0.3)) != config_hash(Before())
    # backbone_bn is such a field: the SSD recipe's LWS stages hash as they did before it existed
    lws = ssd.stages["teacher_lws"]
    assert isinstance(lws, RebalanceConfig) and lws.backbone_bn == "eval"
    # (as is sampler.class_order, inside it)
    without = {k: v for k, v in config_to_dict(lws).items() if k != "backbone_bn"}
    without["sampler"] = {k: v for k, v in without["sampler"].items() if k != "class_order"}
    assert config_hash(lws) == config_hash(without)
    assert config_hash(apply_overrides(ssd, ["stages.teacher_lws.backbone_bn=train"])) != config_hash(ssd)

# ---- the CIFAR recipes carry the paper settings -----------------------------------------------------


def _assert_cifar_training(optim: OptimConfig) -> None:
    assert (optim.epochs, optim.batch_size, optim.lr, optim.momentum, optim.weight_decay) == (200, 128, 0.1, 0.9, 2e-4)
    assert (optim.warmup_epochs, optim.schedule) == (5, "step")
    assert optim.milestones == (160, 180) and optim.decay_factors == (0.01, 1e-4)


def _assert_cifar_rebalance(stage: RebalanceConfig, source: str, head: str) -> None:
    assert (stage.method, stage.source, stage.head) == ("lws", source, head)
    assert (stage.optim.epochs, stage.optim.lr, stage.optim.batch_size) == (5, 0.2, 512)
    assert stage.sampler.kind == "class_balanced"


@pytest.mark.parametrize("imbalance", [100, 50, 10])
@pytest.mark.parametrize("dataset", ["cifar100", "cifar10"])
def test_cifar_ssd_recipe(dataset, imbalance):
    config = get_recipe(f"{dataset}-lt-if{imbalance}/ssd")
    assert config.data.dataset == f"{dataset}_lt" and config.data.imbalance_factor == imbalance
    assert list(config.stages) == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    teacher, student = config.stages["teacher"], config.stages["student"]
    assert (teacher.model.arch, teacher.model.width, teacher.model.classifier) == ("resnet32", 16, "linear")
    assert teacher.loss.kind == "ce" and teacher.rotation_weight == 1.0 and teacher.sampler.kind == "instance"
    _assert_cifar_training(teacher.optim)
    _assert_cifar_rebalance(config.stages["teacher_lws"], "teacher", "cls")
    assert config.stages["soft_labels"].source == "teacher_lws"
    assert (student.method, student.teacher, student.temperature) == ("ssd", "soft_labels", 2.0)
    assert (student.hard_weight, student.soft_weight) == (1.0, 1.0)
    assert student.model == teacher.model and student.sampler.kind == "instance"
    _assert_cifar_training(student.optim)
    _assert_cifar_rebalance(config.stages["student_lws"], "student", "hard")


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_cifar_dive_recipe(imbalance):
    config = get_recipe(f"cifar100-lt-if{imbalance}/dive")
    teacher, student = config.stages["teacher"], config.stages["student"]
    assert teacher.loss.kind == "bsce" and teacher.rotation_weight == 0.0
    assert teacher.model.arch == "resnet32"
    _assert_cifar_training(teacher.optim)
    assert (student.method, student.teacher) == ("dive", "teacher")
    assert (student.temperature, student.power, student.alpha) == (3.0, 0.5, 0.5)
    assert student.temperature_from == ""  # the paper's fixed (T, p), not the rule of thumb
    _assert_cifar_training(student.optim)
    assert config.result == "student"


def test_cifar_baseline_recipes():
    ce = get_recipe("cifar100-lt-if100/ce")
    assert list(ce.stages) == ["teacher"] and ce.stages["teacher"].loss.kind == "ce"
    _assert_cifar_training(ce.stages["teacher"].optim)
    assert get_recipe("cifar100-lt-if100/bsce").stages["teacher"].loss.kind == "bsce"
    lws = get_recipe("cifar100-lt-if100/lws")
    assert list(lws.stages) == ["teacher", "lws"]
    _assert_cifar_rebalance(lws.stages["lws"], "teacher", "cls")
    ldam = get_recipe("cifar100-lt-if100/ldam-drw").stages["teacher"]
    assert (ldam.loss.kind, ldam.loss.drw_epoch, ldam.model.classifier) == ("ldam", 160, "cosine")
    _assert_cifar_training(ldam.optim)


@pytest.mark.parametrize("imbalance", [100, 50, 10])
@pytest.mark.parametrize("method", ["ce", "bsce", "crt", "lws", "tau-norm", "dive", "ssd", "ssd-dive"])
def test_cifar_bbn_recipes_differ_only_in_the_lr_schedule_and_nesterov(method, imbalance):
    """SSD and DiVE say they follow BBN's schedule: x0.01 in the 120th and x1e-4 from the 160th epoch
    (absolute), with BBN's SGD with Nesterov momentum; SSD re-ran its CE and LWS baselines with it."""
    default, bbn = get_recipe(f"cifar100-lt-if{imbalance}/{method}"), get_recipe(f"cifar100-lt-if{imbalance}-bbn/{method}")
    assert bbn.name == f"cifar100-lt-if{imbalance}-bbn/{method}" and bbn.data == default.data
    assert list(bbn.stages) == list(default.stages)
    for name, stage in bbn.stages.items():
        optim = getattr(stage, "optim", None)
        if optim is not None and optim.schedule == "step":  # the teacher and the student
            assert (optim.milestones, optim.decay_factors, optim.nesterov) == ((119, 159), (0.01, 1e-4), True)
            stage = dataclasses.replace(stage, optim=dataclasses.replace(optim, milestones=(160, 180), nesterov=False))
        assert stage == default.stages[name], name
    # BBN's loop: `for epoch in range(1, 201): scheduler.step(); train(...)`, its scheduler's factor
    # gamma ** bisect_right((120, 160), epoch) (after its 5 warm-up epochs).
    bbn_lr = [0.1 * 0.01 ** bisect.bisect_right((120, 160), epoch) for epoch in range(1, 201)]
    np.testing.assert_allclose(lr_schedule(bbn.stages["teacher"].optim, 1)[5:], bbn_lr[5:], rtol=1e-12)
    assert lr_schedule(bbn.stages["teacher"].optim, 1)[[118, 119, 158, 159]].tolist() == pytest.approx([0.1, 1e-3, 1e-3, 1e-5])


@pytest.mark.parametrize("prefix", ["imagenet-lt", "imagenet-lt-135ep", "inat18", "inat18-200ep", "places-lt"])
def test_large_data_rebalancing_recipes(prefix):
    """METHODS.md: cRT 10 epochs, LWS 5 (in every method that uses it), lr 0.2, batch 512, cosine,
    4 samples per class per draw; tau-norm's tau swept on validation where a validation split exists."""
    for method, stage_names in {"crt": ["crt"], "lws": ["lws"], "ssd": ["teacher_lws", "student_lws"],
                                "ssd-dive": ["teacher_lws", "student_lws"], "tau-norm": ["tau_norm"]}.items():
        config = get_recipe(f"{prefix}/{method}")
        for name in stage_names:
            stage = config.stages[name]
            epochs = {"crt": 10, "lws": 5, "tau_norm": 10}[stage.method]
            assert (stage.optim.epochs, stage.optim.lr, stage.optim.batch_size, stage.optim.schedule) == (epochs, 0.2, 512, "cosine")
            # classifier-balancing's configs: wd 1e-4 on iNaturalist18, 5e-4 on ImageNet-LT (and Places-LT here)
            assert stage.optim.weight_decay == (1e-4 if prefix.startswith("inat18") else 5e-4), (method, name)
            assert (stage.sampler.kind, stage.sampler.samples_per_class) == ("class_balanced", 4), (method, name)
            assert stage.tau_search == (stage.method == "tau_norm" and not prefix.startswith("inat18")), (method, name)
    teacher = get_recipe(f"{prefix}/ssd").stages["teacher"]
    epochs = {"imagenet-lt": 90, "imagenet-lt-135ep": 135, "inat18": 90, "inat18-200ep": 200, "places-lt": 30}[prefix]
    assert teacher.optim.epochs == get_recipe(f"{prefix}/ssd").stages["student"].optim.epochs == epochs
    assert teacher.moco_weight == 1.0 and teacher.rotation_weight == 0.0


@pytest.mark.parametrize("prefix", ["imagenet-lt", "imagenet-lt-135ep", "inat18", "inat18-200ep"])
def test_large_data_training_recipes(prefix):
    """METHODS.md: ImageNet-LT trains a ResNeXt-50 32x4d with wd 5e-4 and DiVE without power
    normalisation (T = 3, p = 1); iNat18 a ResNet-50 with wd 1e-4 and DiVE at T = 3, p = 0.5. Both
    batch 256, lr 0.1 cosine (the recipes' docstrings), teacher and student alike."""
    imagenet = prefix.startswith("imagenet")
    arch, weight_decay, power = ("resnext50_32x4d", 5e-4, 1.0) if imagenet else ("resnet50", 1e-4, 0.5)
    for method in ("ce", "dive", "ssd"):
        config = get_recipe(f"{prefix}/{method}")
        for name in ("teacher", "student"):
            if name not in config.stages:
                continue
            stage = config.stages[name]
            assert stage.model.arch == arch, (method, name)
            assert (stage.optim.batch_size, stage.optim.lr, stage.optim.schedule, stage.optim.weight_decay) == \
                (256, 0.1, "cosine", weight_decay), (method, name)
    student = get_recipe(f"{prefix}/dive").stages["student"]
    assert (student.temperature, student.power, student.alpha) == (3.0, power, 0.5)


@pytest.mark.parametrize("prefix", ["cifar100-lt-if100", "imagenet-lt", "inat18", "places-lt"])
def test_ssd_dive_recipe_distils_the_re_balanced_self_supervised_teacher(prefix):
    """SSD's teacher after its stage II (LWS), distilled with DiVE's targets; stage IV is LWS again."""
    ssd, config = get_recipe(f"{prefix}/ssd"), get_recipe(f"{prefix}/ssd-dive")
    assert list(config.stages) == ["teacher", "teacher_lws", "student", "student_lws"]
    assert config.stages["teacher"] == ssd.stages["teacher"] and config.stages["teacher_lws"] == ssd.stages["teacher_lws"]
    student, stage_iv = config.stages["student"], config.stages["student_lws"]
    assert (student.method, student.teacher) == ("dive", "teacher_lws")
    assert (stage_iv.method, stage_iv.source, stage_iv.head) == ("lws", "student", "cls")
    assert stage_iv.optim == ssd.stages["student_lws"].optim and stage_iv.sampler == ssd.stages["student_lws"].sampler


def test_drw_starting_at_the_last_epoch_is_refused():
    """drw_epoch is the first epoch with re-weighting: at optim.epochs it would never start."""
    ldam = get_recipe("cifar100-lt-if100/ldam-drw")
    with pytest.raises(ValueError, match=r"loss.drw_epoch=200 is not before the last epoch \(optim.epochs=200\)"):
        apply_overrides(ldam, ["stages.teacher.loss.drw_epoch=200"])
    assert apply_overrides(ldam, ["stages.teacher.loss.drw_epoch=199"]).stages["teacher"].loss.drw_epoch == 199


# ---- lr schedules -------------------------------------------------------------------------------------


def test_step_schedule_with_linear_warmup():
    config = OptimConfig(epochs=10, lr=0.1, warmup_epochs=2, milestones=(6, 8), decay_factors=(0.01, 1e-4))
    lrs = lr_schedule(config, iterations_per_epoch=4)
    assert lrs.shape == (40,)
    # warm-up: lr / 8, 2 lr / 8, ..., lr over the first 2 epochs x 4 iterations
    np.testing.assert_allclose(lrs[:8], [0.1 * k / 8 for k in range(1, 9)], rtol=1e-15)
    np.testing.assert_array_equal(lrs[8:24], 0.1)
    np.testing.assert_allclose(lrs[24:32], 0.1 * 0.01, rtol=1e-15)  # absolute factors, not cumulative
    np.testing.assert_allclose(lrs[32:], 0.1 * 1e-4, rtol=1e-15)


def test_cifar_schedule_matches_ldam_drw():
    lrs = lr_schedule(get_recipe("cifar100-lt-if100/ce").stages["teacher"].optim, iterations_per_epoch=3)
    per_epoch_last = lrs.reshape(200, 3)[:, -1]
    assert per_epoch_last[4] == pytest.approx(0.1)  # warm-up reaches lr at the end of epoch 5
    assert lrs[0] == pytest.approx(0.1 / 15)
    assert np.all(lrs.reshape(200, 3)[5:160] == 0.1)
    np.testing.assert_allclose(lrs.reshape(200, 3)[160:180], 1e-3, rtol=1e-15)  # epoch index 160 = LDAM's "epoch > 160"
    np.testing.assert_allclose(lrs.reshape(200, 3)[180:], 1e-5, rtol=1e-15)


def test_cosine_schedule_endpoints():
    config = OptimConfig(epochs=5, lr=0.2, warmup_epochs=0, schedule="cosine")
    lrs = lr_schedule(config, iterations_per_epoch=10)
    total = 50
    assert lrs[0] == 0.2
    assert lrs[25] == pytest.approx(0.1, rel=1e-12)  # half way: lr / 2
    assert lrs[-1] == pytest.approx(0.5 * 0.2 * (1 + math.cos(math.pi * (total - 1) / total)), rel=1e-12)
    assert lrs[-1] < 0.2 * 1e-3
    assert np.all(np.diff(lrs) < 0)


def test_cosine_schedule_after_warmup():
    config = OptimConfig(epochs=6, lr=0.4, warmup_epochs=2, schedule="cosine")
    lrs = lr_schedule(config, iterations_per_epoch=5)
    np.testing.assert_allclose(lrs[:10], [0.4 * k / 10 for k in range(1, 11)], rtol=1e-15)
    assert lrs[10] == 0.4  # the cosine starts at the full lr right after warm-up
    remaining = 20
    expected = [0.5 * 0.4 * (1 + math.cos(math.pi * k / remaining)) for k in range(remaining)]
    np.testing.assert_allclose(lrs[10:], expected, rtol=1e-12)


def test_constant_schedule():
    lrs = lr_schedule(OptimConfig(epochs=3, lr=0.05, warmup_epochs=1, schedule="constant"), iterations_per_epoch=2)
    np.testing.assert_allclose(lrs, [0.025, 0.05, 0.05, 0.05, 0.05, 0.05], rtol=1e-15)


def test_coupled_fields_can_change_together(ssd):
    changed = apply_overrides(ssd, ["stages.teacher.optim.milestones=120,160", "stages.teacher.optim.decay_factors=0.01,0.0001"])
    assert changed.stages["teacher"].optim.milestones == (120, 160)
    with pytest.raises(ValueError, match="same length"):
        apply_overrides(ssd, ["stages.teacher.optim.milestones=120"])


# ---- value ranges: nan / inf, negative counts, and the CLI's one-line errors -----------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.teacher.optim.lr=nan", r"optim.lr must be a finite number > 0, got nan"),
        ("stages.teacher.optim.lr=inf", r"optim.lr must be a finite number > 0, got inf"),
        ("stages.teacher.optim.momentum=nan", r"optim.momentum must be in \[0, 1\), got nan"),
        ("stages.teacher.optim.momentum=1", r"optim.momentum must be in \[0, 1\), got 1.0"),
        ("stages.teacher.optim.momentum=-0.1", r"optim.momentum must be in \[0, 1\), got -0.1"),
        ("stages.teacher.optim.weight_decay=-1e-4", r"optim.weight_decay must be a finite number >= 0, got -0.0001"),
        ("stages.teacher.optim.weight_decay=inf", r"optim.weight_decay must be a finite number >= 0, got inf"),
        ("stages.teacher.optim.decay_factors=(0.01,nan)", r"optim.decay_factors must be finite numbers > 0"),
        ("stages.teacher.optim.milestones=(-1,180)", r"optim.milestones must be epochs >= 0"),
        ("stages.teacher.rotation_weight=inf", r"rotation_weight must be a finite number >= 0, got inf"),
        ("stages.teacher.rotation_weight=nan", r"rotation_weight must be a finite number >= 0, got nan"),
        ("stages.teacher.eval_every=-3", r"stages.teacher: eval_every must be >= 0 .*got -3"),
        ("stages.student.temperature=nan", r"temperature must be a finite number > 0, got nan"),
        ("stages.student.hard_weight=-1", r"hard_weight must be a finite number >= 0, got -1.0"),
        ("stages.student.soft_weight=inf", r"soft_weight must be a finite number >= 0, got inf"),
        ("stages.student.eval_every=-1", r"stages.student: eval_every must be >= 0"),
        ("stages.teacher_lws.tau=nan", r"tau must be a finite number >= 0, got nan"),
        ("seed=-1", r"seed must be in \[0, 2\*\*32\), got -1"),
        ("seed=99999999999999999999999", r"seed must be in \[0, 2\*\*32\), got 99999999999999999999999"),
        # fields of configs defined outside ltscale/stages are caught by the pipeline's sweep, by key
        ("stages.teacher.loss.ldam_scale=nan", r"stages.teacher.loss.*ldam_scale must be a finite number > 0, got nan"),
        ("stages.teacher.moco.temperature=inf", r"stages.teacher.moco.*temperature must be a finite number > 0, got inf"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_key(ssd, override, message):
    assert "teacher_lws" in ssd.stages and "student" in ssd.stages
    with pytest.raises(ValueError, match=message):
        apply_overrides(ssd, [override])


def test_a_float_without_a_range_of_its_own_is_still_checked_for_nan():
    # Every float field has a range check today; the pipeline's sweep over all of them is there for
    # a field added without one. Plant a nan past its own check to see the sweep catch it.
    recipe = get_recipe("demo/ssd")
    data = dataclasses.replace(recipe.data)
    object.__setattr__(data, "imbalance_factor", math.nan)
    with pytest.raises(ValueError, match=r"^data.imbalance_factor must be a finite number, got nan$"):
        dataclasses.replace(recipe, data=data)


def test_distill_and_virtual_example_ranges():
    with pytest.raises(ValueError, match=r"power must be in \(0, 1\], got nan"):
        DistillConfig(power=math.nan)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got nan"):
        DistillConfig(alpha=math.nan)
    with pytest.raises(ValueError, match=r"temperatures must be one or more finite numbers > 0"):
        VirtualExamplesConfig(temperatures=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"temperatures must be one or more"):
        VirtualExamplesConfig(temperatures=())
    with pytest.raises(ValueError, match=r"powers must be one or more numbers in \(0, 1\]"):
        VirtualExamplesConfig(powers=(math.nan,))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.synthetic.noise=-5", r"data.synthetic.noise must be a finite number >= 0 .*got -5.0"),
        ("data.synthetic.noise=nan", r"data.synthetic.noise must be a finite number >= 0 .*got nan"),
        ("data.synthetic.max_per_class=0", r"data.synthetic.max_per_class must be >= 1, got 0"),
        ("data.synthetic.test_per_class=0", r"data.synthetic.test_per_class must be >= 1, got 0"),
        ("data.synthetic.imbalance_factor=nan", r"data.synthetic.imbalance_factor must be a finite number >= 1, got nan"),
        ("data.synthetic.seed=-2", r"data.synthetic.seed must be in \[0, 2\*\*32\), got -2"),
        ("data.synthetic.image_size=100000", r"data.synthetic.image_size must be in \[8, 256\], got 100000"),
        ("data.synthetic.max_per_class=20", r"data.synthetic: imbalance factor 80 leaves the rarest of 30 classes no image"),
        ("data.loader.max_bad_image_fraction=nan", r"max_bad_image_fraction must be in \[0, 1\), got nan"),
        ("data.loader.max_bad_image_fraction=1", r"max_bad_image_fraction must be in \[0, 1\), got 1"),
        ("data.loader.backend=torch", r"data.loader.backend=torch decodes image files; synthetic is held in memory"),
    ],
)
def test_synthetic_data_fields_are_checked(override, message):
    with pytest.raises(ValueError, match=message) as caught:
        apply_overrides(get_recipe("demo/ce"), [override])
    assert "data.synthetic: data.synthetic" not in str(caught.value)  # where it is, said once


def test_cifar_imbalance_factor_must_be_finite(ssd):
    with pytest.raises(ValueError, match=r"data.imbalance_factor must be a finite number >= 1, got nan"):
        apply_overrides(ssd, ["data.imbalance_factor=nan"])


def test_synthetic_rarest_class_is_checked_as_the_counts_are_computed():
    from ltscale.data.synthetic import make_synthetic

    with pytest.raises(ValueError, match=r"int\(49 x 1/49\) = 0"):  # the old ratio check let it through
        apply_overrides(get_recipe("demo/ce"), ["data.synthetic.max_per_class=49", "data.synthetic.imbalance_factor=49"])
    config = apply_overrides(get_recipe("demo/ce"), ["data.synthetic.max_per_class=50", "data.synthetic.imbalance_factor=50"])
    assert make_synthetic(config.data.synthetic).train.class_counts().min() == 1


def test_cifar_imbalance_factor_must_leave_every_class_an_image(ssd):
    with pytest.raises(ValueError, match=r"data.imbalance_factor: cifar100_lt's imbalance factor 1000 leaves the rarest "
                                         r"of 100 classes no image \(int\(500 x 1/1000\) = 0"):
        apply_overrides(ssd, ["data.imbalance_factor=1000"])
    assert apply_overrides(ssd, ["data.imbalance_factor=500"]).data.imbalance_factor == 500  # one image left
    cifar10 = apply_overrides(ssd, ["data.dataset=cifar10_lt", "data.imbalance_factor=5000"])
    assert cifar10.data.imbalance_factor == 5000


def _cli(capsys, *argv):
    from ltscale.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_reports_a_nan_override_in_one_line(capsys, tmp_path):
    code, err = _cli(capsys, "run", "demo/ce", "--plan", "--set", f"output_dir={tmp_path}",
                     "--set", "stages.teacher.optim.lr=nan")
    assert code == 2
    assert err.strip() == "ltscale: error: stages.teacher.optim: optim.lr must be a finite number > 0, got nan"


def test_cli_rejects_an_output_dir_under_a_file(capsys, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    for plan in (["--plan"], []):
        code, err = _cli(capsys, "run", "demo/ce", *plan, "--set", f"output_dir={blocker}/run")
        assert code == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert f"output_dir='{blocker}/run'" in err and f"under {blocker}, which is a file" in err
    code, err = _cli(capsys, "run", "demo/ce", "--set", f"output_dir={blocker}")
    assert code == 2 and f"output_dir='{blocker}' is a file, not a directory" in err


def test_cli_ctrl_c_is_one_line_and_exit_130(capsys, tmp_path, monkeypatch):
    import ltscale.stages.pipeline as pipeline

    def interrupted(config, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    code, err = _cli(capsys, "run", "demo/ce", "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("ltscale: interrupted; finished stages are kept")
    assert "resumes an interrupted training stage from its last completed epoch" in err


def test_cli_ctrl_c_prints_nothing_on_other_ranks(capsys, tmp_path, monkeypatch):
    import ltscale.cli as cli
    import ltscale.stages.pipeline as pipeline

    def interrupted(config, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    monkeypatch.setattr(cli, "_is_main", lambda: False)
    code, err = _cli(capsys, "run", "demo/ce", "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 130 and err == ""


def test_cli_reports_a_tracking_store_failure_in_one_line(capsys, tmp_path, monkeypatch):
    import ltscale.stages.pipeline as pipeline
    from mlflow.exceptions import MlflowException

    def store_down(config, progress=None):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception\nretries")

    monkeypatch.setattr(pipeline, "run_pipeline", store_down)
    code, err = _cli(capsys, "run", "demo/ce", "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("ltscale: error: the MLflow tracking store failed: API request to endpoint")
    assert "rerun the same command once the store answers to resume" in err


def test_cli_reports_a_broken_launcher_environment_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, err = _cli(capsys, "run", "demo/ce", "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 2
    assert err.strip() == "ltscale: error: WORLD_SIZE not set while RANK is: set both (torchrun does)"


def _documented_recipes(text: str) -> set[str]:
    """Every recipe a shell block of ``text`` runs (``ltscale run R``, ``launch.submit R ...``, ``{a,b}`` expanded)."""
    names = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for match in re.finditer(r"(?:\brun|launch\.submit)\s+((?:[\w.{},-]+/[\w.{},-]+\s+)+)", block):
            for word in match.group(1).split():
                braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", word)
                names.update([braces.group(1) + part + braces.group(3) for part in braces.group(2).split(",")]
                             if braces else [word])
    return names


def test_every_recipe_the_docs_run_exists():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    known = list_recipes()
    for doc in ("README.md", "tools/README.md"):
        named = _documented_recipes((root / doc).read_text())
        assert doc != "README.md" or {"imagenet-lt/ssd", "places-lt/ce", "cifar100-lt-if100/lws", "demo/dive"} <= named
        assert sorted(named - set(known)) == [], f"{doc} runs recipes that do not exist"


def test_settings_that_would_do_nothing_are_refused():
    # torchvision backbones have fixed widths: model.width would only have changed the stage's key
    with pytest.raises(ValueError, match="model.width=64 sets the CIFAR ResNets' base channels; model.arch=resnet50 has a fixed width"):
        apply_overrides(get_recipe("inat18/ce"), ["stages.teacher.model.width=64"])
    from ltscale.models.heads import HeadSpec
    from ltscale.models.network import Network

    # ... and a model saved with one before that was checked still loads (it is the same network).
    network = Network.from_spec({"model": {"arch": "resnet50", "width": 64, "classifier": "linear", "init_from": ""},
                                 "heads": {"cls": dataclasses.asdict(HeadSpec("linear", 3))}, "predict_head": "cls"})
    assert network.config.width == 16 and network.feature_dim == 2048
    with pytest.raises(ValueError, match=r"loss.drw_epoch=160 is not before the last epoch \(optim.epochs=100\): DRW would never start"):
        apply_overrides(get_recipe("cifar100-lt-if100/ldam-drw"), ["stages.teacher.optim.epochs=100"])
    with pytest.raises(ValueError, match=r"result_stage 'virtual_examples' has no test metrics \(it produces a virtual-example "
                                         r"distribution\); name a stage that trains or re-balances a model: \['teacher', 'student'\]"):
        apply_overrides(get_recipe("demo/dive"), ["result_stage=virtual_examples"])
    assert apply_overrides(get_recipe("demo/dive"), ["result_stage=teacher"]).result == "teacher"


def test_cli_tags_reach_the_tracking_config_and_bad_ones_are_named(capsys, tmp_path):
    import argparse

    from ltscale.cli import _pipeline_config

    args = argparse.Namespace(overrides=[f"output_dir={tmp_path}"], device=None,
                              tags=["sweep=lr-0.05,wd-2e-4", "note=a=b"])
    config = _pipeline_config("demo/ce", args)
    # commas and '=' survive in a value (they would not through --set's tuple syntax)
    assert config.tracking.tags() == {"sweep": "lr-0.05,wd-2e-4", "note": "a=b"}
    for tag, message in [("sweep", "'sweep' is not KEY=VALUE"), ("=x", "'=x' is not KEY=VALUE"),
                         ("ltscale.pipeline=x", "tag 'ltscale.pipeline' is reserved"),
                         ("mlflow.runName=x", "tag 'mlflow.runName' is reserved")]:
        code, err = _cli(capsys, "run", "demo/ce", "--plan", "--set", f"output_dir={tmp_path}", "--tag", tag)
        assert code == 2 and f"ltscale: error: --tag: tracking.run_tags: {message}" in err, err
    code, err = _cli(capsys, "run", "demo/ce", "--plan", "--set", f"output_dir={tmp_path}", "--tag", "a=1", "--tag", "a=2")
    assert code == 2 and "tag 'a' is given twice ('1' and '2')" in err


def test_synthetic_set_head_first_test_images_its_own_and_layout_by_seed(monkeypatch):
    """Class 0 is the largest (the profile runs head to tail), the test images are drawn apart from
    the training ones (none repeats one, even where the two could coincide), and the seed changes
    the classes' look, not only the noise."""
    from ltscale.data.cifar import long_tailed_counts
    from ltscale.data.config import SyntheticConfig
    from ltscale.data import synthetic
    from ltscale.data.synthetic import make_synthetic

    config = SyntheticConfig(num_classes=4, max_per_class=12, imbalance_factor=4.0, test_per_class=12, image_size=8)
    bundle = make_synthetic(config)
    np.testing.assert_array_equal(bundle.train.class_counts(), long_tailed_counts(12, 4, 4.0))
    assert bundle.train.class_counts()[0] == 12 and bundle.train.class_counts()[-1] == 3
    # Balanced, with as many test as training images per class: the label lists are equal, so a
    # test set drawn from the training stream would repeat the training images one for one.
    balanced = make_synthetic(dataclasses.replace(config, imbalance_factor=1.0))
    np.testing.assert_array_equal(balanced.train.targets, balanced.test.targets)
    train = {image.tobytes() for image in balanced.train.images}
    assert not any(image.tobytes() in train for image in balanced.test.images)
    layouts = []
    original = synthetic._class_attributes
    monkeypatch.setattr(synthetic, "_class_attributes", lambda *args: layouts.append(original(*args)) or layouts[-1])
    make_synthetic(config), make_synthetic(dataclasses.replace(config, seed=1))
    assert len(layouts) == 2 and repr(layouts[0]) != repr(layouts[1])


def test_override_spellings_that_are_accepted_and_refused(ssd):
    """Booleans take on/off/yes/no/1/0 besides true/false; an empty value sets an optional field
    to None; blanks around a key are ignored; a choice must match exactly (case included)."""
    for text, value in [("on", True), ("off", False), ("yes", True), ("no", False), ("1", True), ("0", False), ("TRUE", True)]:
        assert apply_overrides(ssd, [f"stages.teacher.optim.nesterov={text}"]).stages["teacher"].optim.nesterov is value, text
    assert parse_value("", Optional[int], "k") is None and parse_value(" ", int | None, "k") is None
    assert apply_overrides(ssd, [" seed = 3"]).seed == 3
    with pytest.raises(ConfigError, match=r"precision='BF16': expected one of"):
        apply_overrides(ssd, ["precision=BF16"])


def test_a_recipe_name_is_registered_once_and_described_in_one_line(monkeypatch):
    from ltscale.config import registry

    list_recipes()  # the real recipes registered first, then a private copy of the registry
    monkeypatch.setattr(registry, "_RECIPES", dict(registry._RECIPES))
    monkeypatch.setattr(registry, "_DESCRIPTIONS", dict(registry._DESCRIPTIONS))

    def toy():
        """A toy recipe.

        More about it, which `ltscale recipes` does not print."""

    registry.recipe("test/toy")(toy)
    registry.recipe("test/toy")(toy)  # the same function again (a module imported twice): fine
    assert list_recipes()["test/toy"] == "A toy recipe."
    with pytest.raises(ValueError, match=r"recipe 'test/toy' is registered twice"):
        registry.recipe("test/toy")(lambda: None)

    def blank():
        """   """
    registry.recipe("test/blank")(blank)  # a docstring of spaces describes nothing (it raised IndexError)
    assert list_recipes()["test/blank"] == ""


def test_config_hash_values_are_stable_and_ignore_dict_order():
    """Stage keys name stored outputs: a change to how hashes are computed (key order, separators,
    digest) would silently orphan every stored stage, so one value is pinned."""
    assert config_hash({"b": 1, "a": [1.5, "x"]}, "parent") == config_hash({"a": [1.5, "x"], "b": 1}, "parent")
    # sha256 of the canonical JSON [{"a":[1.5,"x"],"b":1},"parent"], cut to 16 hex digits
    assert config_hash({"b": 1, "a": [1.5, "x"]}, "parent") == "158ef4758f51ccba"


def test_cli_flags_reach_the_config(tmp_path):
    import argparse

    from ltscale.cli import _pipeline_config, build_parser

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    args = build_parser().parse_args(["run", "demo/ce", "--no-progress", "--device", "cpu", "--output-dir", str(tmp_path),
                                      "--tracking-uri", uri, "--tag", "b=2", "--set", "tracking.run_tags=a=1"])
    config = _pipeline_config(args.recipe, args)
    assert config.progress is False and config.device == "cpu" and config.output_dir == str(tmp_path)
    assert config.tracking.tracking_uri == uri
    assert config.tracking.tags() == {"a": "1", "b": "2"}  # --tag adds to the recipe's tags, not in place of them
    default = _pipeline_config("demo/ce", argparse.Namespace(overrides=[], device=None))
    assert default.progress is True


def test_cli_demo_sends_a_star_override_to_every_recipe_with_the_field(capsys, tmp_path):
    """``stages.*.<field>`` goes to each demo recipe where some stage has the field (SSD's and
    DiVE's students have a temperature, CE has no student)."""
    code, err = _cli(capsys, "demo", "--set", "stages.*.temperature=0", "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "recipe demo/ssd: stages.student: temperature must be a finite number > 0" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_evaluate_takes_data_device_and_precision_settings_only(capsys, tmp_path):
    missing = tmp_path / "model.pt"
    for setting in ("precision=fp32", "device=cpu", "data.synthetic.num_classes=5"):
        code, err = _cli(capsys, "evaluate", str(missing), "--recipe", "demo/ce", "--set", setting)
        assert code == 2 and f"checkpoint {missing} does not exist" in err, (setting, err)  # past the check of the keys
    code, err = _cli(capsys, "evaluate", str(missing), "--recipe", "demo/ce", "--set", "stages.teacher.optim.lr=1")
    assert code == 2 and "ltscale evaluate reads only the recipe's data.*, device and precision" in err


def test_cli_recipes_lists_names_containing_the_filter(capsys):
    from ltscale.cli import main

    assert main(["recipes", "if100/ssd"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "cifar100-lt-if100/ssd" in names and "cifar10-lt-if100/ssd" in names
    assert all("if100/ssd" in name for name in names)


def test_cli_plan_creates_no_output_directory(capsys, tmp_path):
    """--plan runs nothing: a mistyped --output-dir must not leave a directory behind."""
    from ltscale.cli import main

    assert main(["run", "demo/ce", "--plan", "--output-dir", str(tmp_path / "new")]) == 0
    assert "teacher  run" in capsys.readouterr().out and not (tmp_path / "new").exists()
