"""Inference spread over the processes of a launch: each process takes every N-th batch of a fixed batching
of the prompts, and the results are gathered, in prompt order, on every process.

Cutting the batches before they are dealt out keeps every batch the one a single process would run, so N
processes give the answers one process gives, token for token."""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

T = TypeVar("T")


class Processes(Protocol):
    """What sharding needs of Accelerate's PartialState."""

    process_index: int
    num_processes: int
    is_main_process: bool


def one_process(processes: Processes | None) -> bool:
    return processes is None or processes.num_processes == 1


def deal(items: list[T], processes: Processes | None) -> list[T]:
    """This process's share of `items`: every N-th, from its own index."""
    return items if one_process(processes) else items[processes.process_index :: processes.num_processes]


def batches(total: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) batches of [0, total), each batch_size long but the last."""
    return [(start, min(total, start + batch_size)) for start in range(0, total, batch_size)]


def my_batches(total: int, batch_size: int, processes: Processes | None) -> list[tuple[int, int]]:
    """This process's batches of [0, total)."""
    return deal(batches(total, batch_size), processes)


def shares(total: int, batch_size: int, processes: Processes | None) -> list[int]:
    """How many of the `total` items each process takes, in process order (known to all without asking)."""
    count = 1 if one_process(processes) else processes.num_processes
    sizes = [stop - start for start, stop in batches(total, batch_size)]
    return [sum(sizes[rank::count]) for rank in range(count)]


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


def sum_over(values: torch.Tensor, processes: Processes | None) -> torch.Tensor:
    """`values` summed over the processes (as is for one): a gather where each item is nonzero on one only."""
    if one_process(processes):
        return values
    from accelerate.utils import reduce

    return reduce(values, reduction="sum")


def main_value(value: T, processes: Processes | None) -> T:
    """The main process's `value`, on every process: one answer to a question whose answer could differ
    between them for a moment (does a cache file exist yet?), so that they all take the same branch."""
    if one_process(processes):
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
