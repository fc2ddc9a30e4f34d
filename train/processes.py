"""The process state of a run: one process, or N under `accelerate launch`, decided once.

TrainingArguments builds accelerate's shared PartialState when it is constructed, and every later
PartialState, Trainer and barrier reads that state. Under `accelerate launch` the processes learn their
rank and count from torchrun's environment, but nothing tells them to use the CPU: a launch config's
`use_cpu: true` reaches them only through the single-process launcher (ACCELERATE_USE_CPU). Left alone, a
process on a machine without an accelerator then sees itself as the only one and runs the whole pipeline
on its own. So the device is chosen here, from the machine, before the arguments are built
(`train.config.parse` applies `device_defaults`); a config or flag that sets `use_cpu` still wins.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from accelerate import DistributedType, PartialState
from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available, str_to_bool
from transformers import TrainerCallback

from refcal.calibration.models import native_bf16


def has_accelerator() -> bool:
    return torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available()


def device_defaults() -> dict[str, bool]:
    """Defaults for TrainingArguments' device and precision fields: the CPU when the launcher asked for it or
    the machine has no accelerator; TRL's bf16 on an accelerator that has it, fp32 elsewhere.

    On a CPU fp32 even where it computes in bf16 natively: bf16 autocast there trains another model (the
    demo's organism refused 64% of benign prompts instead of 38%, and its calibrated adapter kept 32% of
    XSTest unsafe refusal instead of 78%; one seed) for 1.4x on top of padding-free batches (train/speed.py)."""
    cpu = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) or not has_accelerator()
    return {**({"use_cpu": True} if cpu else {}), **({} if not cpu and native_bf16(cpu) else {"bf16": False})}


def share_cores(state: PartialState) -> None:
    """On an accelerator, each local process takes its share of the machine's cores for the work left on the
    CPU (data, judging, conversions): `accelerate launch` sets OMP_NUM_THREADS to 1 for GPU runs, which is
    right for processes that train on the CPU, not for ones whose models sit on a GPU."""
    if state.device.type != "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@contextmanager
def waiting_processes_threads(state: PartialState):
    """On the CPU, a stage that only the main process runs takes the threads of the processes waiting for it:
    torchrun gives each of N local processes 1/N of the cores (OMP_NUM_THREADS), and they sit in a barrier."""
    threads = torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if state.device.type == "cpu" and local > 1:
        torch.set_num_threads(min(threads * local, os.cpu_count() or threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def global_batch(training_args, processes: int) -> int:
    """Rows per optimizer step: per-device batch x processes x accumulation steps."""
    return training_args.per_device_train_batch_size * processes * training_args.gradient_accumulation_steps


def precision(training_args) -> str:
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"


def describe(state: PartialState, training_args) -> str:
    """One line for the start of a run: where it trains, in how many processes, and the global batch."""
    t = training_args
    processes = state.num_processes
    engine = (
        "one process" if processes == 1 else f"{processes} processes ({state.distributed_type.value}, {state.backend})"
    )
    checkpointing = "gradient checkpointing" if t.gradient_checkpointing else "no gradient checkpointing"
    batches = "padding-free batches" if getattr(t, "padding_free", False) else "padded batches"
    return (
        f"{state.device.type}, {engine}, {precision(t)}, {checkpointing}, {batches}; global batch {global_batch(t, processes)} ="
        f" {t.per_device_train_batch_size} per device x {processes} x {t.gradient_accumulation_steps} accumulation steps"
    )


def shards_weights(state: PartialState) -> bool:
    """Whether the engine shards the model's weights itself from a copy on the CPU (FSDP, DeepSpeed)."""
    return state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


class LoggedPace(TrainerCallback):
    """The clock at each logging step, which reads the device anyway: the pace of the steps after the first
    logging window, free of the first steps' start-up (kernels, allocator) and without a sync of its own."""

    def __init__(self):
        self.marks: list[tuple[int, float]] = []

    def on_log(self, args, state, control, **kwargs):
        if not self.marks or self.marks[-1][0] != state.global_step:
            self.marks.append((state.global_step, time.perf_counter()))

    def steady_step_seconds(self) -> float | None:
        if len(self.marks) < 2 or self.marks[-1][0] == self.marks[0][0]:
            return None
        (first_step, first), (last_step, last) = self.marks[0], self.marks[-1]
        return (last - first) / (last_step - first_step)


def engine_record(trainer, seconds: float, first_step: int, pace: LoggedPace | None = None) -> dict:
    """How the train stage ran: processes, the global batch, steps and their speed (all steps, and the steps
    after the first logging window), peak GPU memory. A resumed run (from `first_step`) times only its own
    steps and reports no token rate."""
    t, state, accelerator = trainer.args, trainer.state, trainer.accelerator
    steps_run = state.global_step - first_step
    logged = [e for e in state.log_history if "num_tokens" in e]  # TRL counts every process's tokens
    step_seconds = seconds / steps_run if steps_run else None
    steady = pace.steady_step_seconds() if pace is not None else None
    tokens_per_step = logged[-1]["num_tokens"] / logged[-1]["step"] if logged and not first_step else None
    return {
        "distributed_type": accelerator.distributed_type.value,
        "processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "global_batch": global_batch(t, accelerator.num_processes),
        "rows": len(trainer.train_dataset),
        "epochs": round(state.epoch or 0.0, 4),
        "steps": state.global_step,
        "step_seconds": None if step_seconds is None else round(step_seconds, 3),
        "steady_step_seconds": None if steady is None else round(steady, 3),
        "tokens_per_second": round(tokens_per_step / step_seconds, 1) if tokens_per_step and step_seconds else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
