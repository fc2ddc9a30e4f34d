"""The whole job as stages that each write an artifact folder under run_dir and are skipped when done.

data -> organism (optional) -> geometry -> train -> eval -> export, each in its own module of train/. A
stage is done when its folder exists: folders are written through a staging folder and renamed whole, so a
killed run leaves either nothing or a complete stage, and the training stage resumes from its last Trainer
checkpoint. The CLI reads STAGES from here, so this module imports torch and the stages only when it runs them.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from trl import ModelConfig, SFTConfig

    from refcal.calibration.geometry.directions import Geometry
    from refcal.calibration.judges.frame import FrameJudge
    from refcal.train.config import RefcalArguments

console = Console(stderr=True)
STAGES = ("data", "organism", "geometry", "train", "eval", "export")
EXTRA_STAGES = ("baselines",)  # run on request, not by `refcal run`
RUN_FILES = (
    "timings.json",
    "profile.json",
    "summary.json",
    "gate.json",
    "report.html",
)  # written atomically beside the stages
REQUIRES = {
    "organism": "data",
    "geometry": "data",
    "train": "geometry",
    "eval": "train",
    "export": "eval",
    "baselines": "geometry",
}


class Run:
    """Paths and shared state of one run folder."""

    def __init__(self, model_args: ModelConfig, args: RefcalArguments, training_args: SFTConfig):
        from accelerate import PartialState

        self.model_args, self.args, self.training_args = model_args, args, training_args
        self.dir = Path(args.run_dir)
        from refcal.train.processes import share_cores

        self.state = PartialState()
        share_cores(self.state)
        self._judge = None  # built on first use: the learned judge fits in seconds, a model judge loads a model
        self._recipe = None  # the data stage's DatasetDict, read once

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def judge(self):
        if self._judge is None:
            from refcal.calibration.infra.profiling import section
            from refcal.calibration.judges.registry import build_judge
            from refcal.data_recipes.sources import default_data_root

            a = self.args
            # the data root is resolved on this side: calibration (the judges) must not import data_recipes
            with section("build the judge"):
                self._judge = build_judge(
                    a.judge,
                    a.data_root or default_data_root(),
                    a.judge_model,
                    a.judge_url,
                    a.judge_timeout,
                    a.judge_retries,
                    self.training_args.trust_remote_code,
                )
        return self._judge

    @property
    def frame_judge(self) -> FrameJudge:
        from refcal.calibration.judges.frame import FrameJudge

        return FrameJudge(self.judge)

    def done(self, stage: str) -> bool:
        """A stage's folder appears whole (atomic rename), except train's: the configs put the Trainer's
        output_dir there, so its checkpoints exist before the stage is done; train.json is written last."""
        folder = self.path(stage)
        return folder.is_dir() and (stage != "train" or (folder / "train.json").is_file())

    @property
    def model_reference(self) -> str:
        """The model being calibrated: the organism when the run builds one, else the given model."""
        record = self.path("organism") / "organism.json"
        if self.args.organism:
            return json.loads(record.read_text())["path"]
        return self.model_args.model_name_or_path

    def rows(self, split: str) -> list[dict]:
        if self._recipe is None:
            from datasets import load_from_disk

            self._recipe = load_from_disk(str(self.path("data") / "recipe"))
        return self._recipe[split].to_list()

    @property
    def device(self):
        """The process's device (Accelerate's state): every model a stage runs sits on it."""
        return self.state.device

    def load(self, dtype: str = "float32", qlora: bool = False, on_device: bool = True):
        """The model being calibrated, on the run's device (`on_device` false: on the CPU, for the Trainer to
        place); with `qlora`, in 4 bits when the config asks for QLoRA (load_in_4bit)."""
        from refcal.calibration.models import four_bit_config, load_model

        if self.model_args.load_in_8bit:
            raise ValueError("refcal supports 4-bit QLoRA (load_in_4bit: true), not 8-bit loading (load_in_8bit)")
        quantization = four_bit_config(self.model_args.bnb_4bit_quant_type) if qlora and self.uses_qlora else None
        device = self.device if on_device else None
        # trust_remote_code is SFTConfig's field, off by default
        return load_model(self.model_reference, dtype, self.training_args.trust_remote_code, quantization, device)

    def batch_size(self, model) -> int:
        """Generation and capture batch for `model`: the config's, or one chosen for its device."""
        from refcal.calibration.infra.batching import batch_size_for

        return batch_size_for(model, self.args.generation_batch_size)

    def generate(self, model, tokenizer, prompts: list[str], max_new_tokens: int, desc: str) -> list[str]:
        """Greedy answers in the batch chosen for `model`'s device, spread over the run's processes."""
        from refcal.calibration.generation import generate

        batch = self.batch_size(model)
        return generate(model, tokenizer, prompts, max_new_tokens, batch, desc=desc, processes=self.state)

    @contextmanager
    def stage_folder(self, stage: str):
        """Where a stage writes its folder: staged and renamed whole by the main process; the other processes,
        which ran the stage with it, write to a throwaway folder."""
        from refcal.calibration.infra.artifacts import atomic_directory

        if self.state.is_main_process:
            with atomic_directory(self.path(stage)) as staging:
                yield staging
        else:
            with tempfile.TemporaryDirectory() as folder:
                yield Path(folder)

    def geometry_for(self, model) -> Geometry:
        """The geometry stage's artifact, refused with both fingerprints shown when it was measured on
        other weights than `model`'s (say, an organism rebuilt in the cache since). Under QLoRA the check
        is the run folder's: 4-bit weights cannot match an unquantised fingerprint."""
        from refcal.calibration.geometry.directions import Geometry
        from refcal.calibration.models import fingerprint

        return Geometry.load(self.path("geometry"), None if self.uses_qlora else fingerprint(model))

    @property
    def uses_qlora(self) -> bool:
        return bool(self.model_args.load_in_4bit)

    def weights_description(self, qlora: bool) -> str:
        if qlora and self.uses_qlora:
            return f"4-bit {self.model_args.bnb_4bit_quant_type} (bitsandbytes), double quantisation, bf16 compute"
        return "unquantised"

    def main_only(self, stage: str, work) -> None:
        """Run a single-process stage on the main process while the others wait for its folder. They poll
        rather than wait at a barrier, which times out after ddp_timeout (30 minutes by default): eval or
        geometry can take longer on a CPU or with a large model. If the main process fails, the launcher
        stops them all."""
        from refcal.train.processes import waiting_processes_threads

        if self.state.is_main_process and not self.done(stage):
            started = time.time()
            with waiting_processes_threads(self.state):
                work()
            console.print(f"[green]✓[/] {stage} ({time.time() - started:.0f}s) -> {self.path(stage)}")
        while not self.state.is_main_process and not self.done(stage):
            time.sleep(1)
        self.state.wait_for_everyone()

    def every_process(self, stage: str, work) -> None:
        """Run a stage whose inference is spread over the processes: each generates its share of the prompts
        and every one gets all the answers (calibration/infra/sharding.py); the main one writes the folder."""
        from refcal.calibration.infra.sharding import main_value

        if main_value(not self.done(stage), self.state):
            started = time.time()
            work()
            if self.state.is_main_process:
                console.print(f"[green]✓[/] {stage} ({time.time() - started:.0f}s) -> {self.path(stage)}")
        self.state.wait_for_everyone()


def run_folder_lock(run: Run):
    """The main process holds run_dir/.lock for the whole run, so a second run on the same folder stops at
    once instead of overwriting its stages; the other processes of the same launch share the main one's."""
    from contextlib import nullcontext

    from refcal.calibration.infra.locks import exclusive_lock

    if not run.state.is_main_process:
        return nullcontext()
    run.dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(run.dir / ".lock", f"run folder {run.dir}", "wait for it or use another run_dir")


def run_stages(run: Run, stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """Run the given stages in order, skipping finished ones; returns seconds spent per stage."""
    from refcal.calibration.infra import profiling
    from refcal.calibration.infra.artifacts import remove_stale_staging
    from refcal.train.stages.baselines import stage_baselines
    from refcal.train.stages.data import stage_data
    from refcal.train.stages.eval import stage_eval
    from refcal.train.stages.export import gate_verdict, stage_export, withholds_export
    from refcal.train.stages.geometry import stage_geometry
    from refcal.train.stages.organism import stage_organism
    from refcal.train.stages.training import stage_train

    work = {
        "data": lambda: run.main_only("data", lambda: stage_data(run)),
        "organism": lambda: stage_organism(run),
        "geometry": lambda: run.every_process("geometry", lambda: stage_geometry(run)),
        "train": lambda: stage_train(run),
        "eval": lambda: run.every_process("eval", lambda: stage_eval(run)),
        "export": lambda: run.main_only("export", lambda: stage_export(run)),
        "baselines": lambda: run.every_process("baselines", lambda: stage_baselines(run)),
    }
    if run.state.is_main_process:
        remove_stale_staging(run.dir, [*STAGES, *EXTRA_STAGES, "sft_data", *RUN_FILES])
    run.state.wait_for_everyone()
    seconds = {}
    for stage in stages:
        needed = REQUIRES.get(stage)
        if needed and needed not in stages and not run.done(needed):
            raise RuntimeError(
                f"stage {stage!r} needs stage {needed!r} first: run `refcal {needed}` with the same config"
            )
        if stage == "geometry" and run.args.organism and not run.done("organism"):
            raise RuntimeError("this config builds an organism: run `refcal organism` with the same config first")
        ran = not run.done(stage)
        if stage == "export" and ran and withholds_export(gate_verdict(run)):
            continue  # every process reads the same verdict; the run's summary prints it
        if ran and run.state.is_main_process:
            console.print(f"[bold]→ {stage}[/]")  # the stage starting; its bars follow, "✓ stage" ends it
        profiling.take()  # what ran before this stage (config, imports) is not the stage's
        started = time.time()
        work[stage]()
        seconds[stage] = round(time.time() - started, 1)
        if ran and run.state.is_main_process:
            record_timing(run, stage, seconds[stage], profiling.take())
    return seconds


def record_timing(run: Run, stage: str, seconds: float, sections: dict | None = None) -> None:
    """run_dir/timings.json: wall seconds of each stage's last completed run (the benchmark's wall times);
    run_dir/profile.json: the same with the stage's timed sections (calibration/infra/profiling.py)."""
    from refcal.calibration.infra.artifacts import atomic_write_text

    profile = {"seconds": seconds, "device": run.device.type, "sections": sections or {}}
    for name, entry in (("timings.json", seconds), ("profile.json", profile)):
        path = run.path(name)
        recorded = json.loads(path.read_text()) if path.exists() else {}
        recorded[stage] = entry
        atomic_write_text(path, json.dumps(recorded, indent=2))
