"""docs/configuration.md is generated from RefcalArguments and must not be stale."""

from __future__ import annotations

import dataclasses

from refcal.train import config_reference
from refcal.train.config import RefcalArguments


def test_configuration_page_is_current():
    text = config_reference.PAGE.read_text(encoding="utf-8")
    assert text == config_reference.render(), "stale: run `python -m refcal.train.config_reference`"


def test_every_field_is_documented_once_in_the_dataclass():
    rendered = config_reference.render()
    for spec in dataclasses.fields(RefcalArguments):
        assert spec.metadata.get("help"), f"RefcalArguments.{spec.name} has no help text"
        assert rendered.count(f"| `{spec.name}` |") == 1


def test_the_groups_are_the_pages_sections_in_order():
    from refcal.train.config import GROUP_STARTS, field_groups

    assert list(GROUP_STARTS.values()) == list(config_reference.GROUPS)
    seen = list(dict.fromkeys(field_groups().values()))  # each group's fields are contiguous, in the page's order
    assert seen == list(config_reference.GROUPS)
