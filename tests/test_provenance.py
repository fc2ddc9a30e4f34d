"""The card's provenance: package versions and the resolved config, seeds included, as JSON."""

from __future__ import annotations

import json

import torch

from refcal.train.config import parse
from refcal.train.provenance import config_record, environment


def test_environment_names_the_installed_versions():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__
    assert env["packages"]["refcal"] is not None and env["python"].count(".") == 2


def test_config_record_holds_every_field_and_the_seeds(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model_name_or_path: some/model\nseed: 7\nseed_data: 3\nlearning_rate: 5.0e-4\nkeep_weight: 2.0\nreport_to: none\nbf16: false\n"
    )
    record = config_record(*parse(["--config", str(config), "--output_dir", str(tmp_path / "out")]))
    assert record["seeds"] == {"training": 7, "data": 3}
    assert record["refcal"]["keep_weight"] == 2.0 and record["training"]["learning_rate"] == 5e-4
    assert record["model"]["model_name_or_path"] == "some/model"
    assert json.loads(json.dumps(record)) == record
