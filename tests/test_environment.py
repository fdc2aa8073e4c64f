"""The runtime record every run and tool result carries (``ltscale.tracking.environment``)."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from ltscale.tracking import code_version, environment_tags, runtime_environment
from ltscale.dist.runtime import usable_cpus
from ltscale.tracking.environment import TAG_PREFIX, cpu_model


def test_the_record_names_versions_processor_and_threads():
    env = runtime_environment("cpu")
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["code_version"] == code_version() and env["device"] == "cpu"
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu"] == cpu_model() and env["cpu"]
    assert not any(key.startswith("gpu") for key in env)
    assert runtime_environment()["device"] is None


def test_usable_cpus_follow_the_affinity_not_the_machine():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cpus() == 1 and runtime_environment()["cpu_count"] == 1
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cpus() == len(before)


def test_tags_are_prefixed_strings_without_unset_entries_or_the_code_version():
    tags = environment_tags({"torch": "2.14.1", "torch_threads": 2, "cudnn": None, "code_version": "abc"})
    assert tags == {f"{TAG_PREFIX}torch": "2.14.1", f"{TAG_PREFIX}torch_threads": "2"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_device_adds_the_gpu():
    env = runtime_environment("cuda")
    assert env["gpu"] == torch.cuda.get_device_name(0) and env["gpu_count"] == torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(0)
    assert env["gpu_capability"] == f"{major}.{minor}" and env["gpu_memory_gib"] > 0
