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


CPU_BATCH = 64  # on a CPU larger batches buy little: the cores are busy from a few rows on
LARGEST_BATCH = 512


def batch_size_for(model: torch.nn.Module, configured: int | None = None, tokens_per_row: int = 512) -> int:
    """The generation batch: `configured` where the config sets one; on a CUDA device as many rows as half of
    its free memory holds (each row's keys and values over `tokens_per_row` tokens, the MLP's widest
    activation and a row of fp32 logits), up to 512; on a CPU 64. Out-of-memory still halves it."""
    if configured:
        return configured
    parameter = next(model.parameters())
    if parameter.device.type != "cuda":
        return CPU_BATCH
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    width = max(config.hidden_size, getattr(config, "intermediate_size", 0) or 0)
    per_token = (2 * config.num_hidden_layers * kv_heads * head_dim + 4 * width) * parameter.element_size()
    per_row = tokens_per_row * per_token + 4 * config.vocab_size
    free, _ = torch.cuda.mem_get_info(parameter.device)
    return int(max(1, min(LARGEST_BATCH, free // 2 // per_row)))
