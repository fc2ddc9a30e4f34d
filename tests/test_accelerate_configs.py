"""Every accelerate config parses with accelerate's own loader and says when to use it."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "accelerate_configs").glob("*.yaml"))
EXPECTED = {
    "cpu_1proc": ("NO", 1),
    "cpu_2proc": ("MULTI_GPU", 2),
    "single_gpu": ("NO", 1),
    "multi_gpu_ddp": ("MULTI_GPU", 8),
    "fsdp": ("FSDP", 8),
    "deepspeed_zero2": ("DEEPSPEED", 8),
    "deepspeed_zero3": ("DEEPSPEED", 8),
    "multi_node": ("MULTI_GPU", 16),
}


def test_every_expected_config_exists():
    assert sorted(p.stem for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_is_documented(path):
    config = ClusterConfig.from_yaml_file(path)
    kind, processes = EXPECTED[path.stem]
    assert str(config.distributed_type).split(".")[-1] == kind
    assert config.num_processes == processes
    assert path.read_text().startswith("# ")  # a comment on when to use it
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] in (2, 3)
    if path.stem.startswith("cpu"):
        assert config.use_cpu
