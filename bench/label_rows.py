"""Hand-label files keep their prompts by reference: the benchmark data stays under the data root and is
never copied into the project. A stored row names its content by source and content id and keeps its
prompt as a template (the prompt with the content, as the task transformed it, replaced by {content});
`restore` reads the contents back from the data root and rebuilds every prompt exactly.
"""

from __future__ import annotations

import functools

from refcal.data_recipes.overlap import content_id
from refcal.data_recipes.sources import SOURCES, load_source
from refcal.data_recipes.tasks import TRANSFORMS


@functools.cache
def _contents(data_root: str | None) -> dict[tuple[str, str], str]:
    """(source, content id) -> text, over every named source."""
    return {(name, content_id(row.text)): row.text for name in SOURCES for row in load_source(name, data_root)}


def strip(row: dict, transform: str = "none", data_root: str | None = None) -> dict:
    """The row with its prompt and content replaced by references (checked to rebuild the prompt)."""
    key = content_id(row["content"])
    sources = [name for name in SOURCES if _contents(data_root).get((name, key)) == row["content"]]
    if not sources:
        raise ValueError(f"row {row['id']}: its content is in no named source")
    source, text = sources[0], row["content"]
    wrapped = TRANSFORMS[transform](text)
    if wrapped not in row["prompt"]:
        raise ValueError(f"row {row['id']}: its content is not in its prompt")
    stored = {k: v for k, v in row.items() if k not in ("prompt", "content")}
    stored |= {"content_source": source, "content_id": content_id(text), "content_transform": transform}
    stored["prompt_template"] = (
        row["prompt"]
        .replace("{", "{{")
        .replace("}", "}}")
        .replace(wrapped.replace("{", "{{").replace("}", "}}"), "{content}")
    )
    if restore([stored], data_root)[0]["prompt"] != row["prompt"]:
        raise ValueError(f"row {row['id']}: its prompt does not rebuild from the template")
    return stored


def restore(rows: list[dict], data_root: str | None = None) -> list[dict]:
    """Rows with `prompt` and `content` read back from the data root."""
    contents = _contents(None if data_root is None else str(data_root))
    out = []
    for row in rows:
        key = (row["content_source"], row["content_id"])
        if key not in contents:
            raise ValueError(f"row {row['id']}: content {row['content_id']} not found in source {key[0]!r}")
        text = contents[key]
        prompt = row["prompt_template"].format(content=TRANSFORMS[row["content_transform"]](text))
        out.append({**row, "prompt": prompt, "content": text})
    return out
