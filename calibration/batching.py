"""Batches that shrink on out-of-memory: capture and generation start at the configured batch size (the
largest tried) and halve it whenever a batch does not fit, so no one has to guess a size per GPU."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shrinking_batches(
    total: int, batch_size: int, run: Callable[[int, int], T], desc: str = "", progress: bool = True
) -> Iterator[tuple[int, int, T]]:
    """(start, stop, run(start, stop)) over [0, total) in order, halving the batch size on out-of-memory
    (down to 1, where the error is raised, naming the items)."""
    start = 0
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        while start < total:
            stop = min(total, start + batch_size)
            try:
                result = run(start, stop)
            except RuntimeError as error:  # torch.OutOfMemoryError is one
                if not out_of_memory(error):
                    raise
                free_memory()
                if batch_size == 1:
                    raise RuntimeError(f"{desc}: item {start} does not fit in memory even alone") from error
                batch_size //= 2
                bar.set_postfix_str(f"out of memory: batch size {batch_size}")
                continue
            yield start, stop, result
            bar.update(stop - start)
            start = stop
