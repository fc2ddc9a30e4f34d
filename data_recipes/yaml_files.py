"""Reading a YAML file that must hold a mapping (a task cluster, a run config), with errors that name the
file and, for malformed YAML, the line and column."""

from __future__ import annotations

from pathlib import Path

import yaml

_VALUE_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "null")}


class _NamesAsWritten(yaml.SafeLoader):
    """Mapping keys are field names: `true:`, `on:` or `1:` stay the text that was written, not a value."""

    def construct_mapping(self, node, deep=False):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag in _VALUE_TAGS:
                key.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: Path, error: type[Exception], what: str) -> dict:
    """The mapping in `path`; anything else raises `error` naming the file. A missing file raises
    FileNotFoundError, for the caller to word."""
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_NamesAsWritten)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as failure:
        raise error(f"{path}: not valid UTF-8 (byte {failure.start})") from failure
    except yaml.YAMLError as failure:
        mark = getattr(failure, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}: malformed YAML{where}: {getattr(failure, 'problem', failure)}") from failure
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping of {what}, got {type(raw).__name__}")
    return raw
