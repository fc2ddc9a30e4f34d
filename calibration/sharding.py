"""Inference spread over the processes of a launch: each process takes every N-th batch of a fixed batching
of the prompts, and the results are gathered, in prompt order, on every process.

Cutting the batches before they are dealt out keeps every batch the one a single process would run, so N
processes give the answers one process gives, token for token."""

from __future__ import annotations

from typing import Protocol, TypeVar

T = TypeVar("T")


class Processes(Protocol):
    """What sharding needs of Accelerate's PartialState."""

    process_index: int
    num_processes: int
    is_main_process: bool


def one_process(processes: Processes | None) -> bool:
    return processes is None or processes.num_processes == 1


def my_batches(total: int, batch_size: int, processes: Processes | None) -> list[tuple[int, int]]:
    """This process's (start, stop) batches of [0, total): every N-th batch of size batch_size."""
    batches = [(start, min(total, start + batch_size)) for start in range(0, total, batch_size)]
    return batches if one_process(processes) else batches[processes.process_index :: processes.num_processes]


def gather_items(items: list[tuple[int, T]], total: int, processes: Processes | None) -> list[T]:
    """Every process's (index, value) pairs, gathered on every process as one list in index order."""
    if not one_process(processes):
        from accelerate.utils import gather_object

        items = gather_object(items)
    values: list = [None] * total
    for index, value in items:
        values[index] = value
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise RuntimeError(f"no process returned items {missing[:5]} of {total}")
    return values


def gather_counts(count: int, processes: Processes | None) -> list[int]:
    """How many items each process took, in process order."""
    if one_process(processes):
        return [count]
    from accelerate.utils import gather_object

    return gather_object([count])
