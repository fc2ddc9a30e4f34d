"""RefcalSFTTrainer and RefcalDPOTrainer: TRL's trainers plus the geometry regularizer on captured hidden states."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from trl import DPOTrainer, SFTTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from refcal.calibration.activations import backbone, layer_output
from refcal.calibration.evaluation import output_logits
from refcal.calibration.models import decoder_layers
from refcal.train.losses.distill import FirstTokenDistill
from refcal.train.losses.onset import RefusalOnset
from refcal.train.losses.regularizer import GeometryRegularizer
from refcal.train.losses.table import GEOMETRY_TERMS, OUTPUT_TERMS, TERMS, LossWeights

FINAL = "final"  # the captured key of the backbone's output (the final norm's), for the output-side terms
ANY_SUPERVISED = "any_supervised"  # the collator's word on whether a batch has answer targets, known on the host


class RowIndexCollator:
    """A TRL collator (language modelling, or preference pairs), carrying each example's `row_index`
    through as a tensor.

    Every batch also carries `last_prompt` (each row's last prompt token; in preference pairs, of the
    chosen half), found here on the host. In language modelling batches rows whose `supervised` is false
    have their labels masked: their completion only marks where the prompt ends, so the regularizer acts on
    them without an answer target (objective: target_free); `any_supervised` (a bool) says whether any row
    kept its labels, which the trainer would otherwise read back from the device.

    `padding_free` (TRL's padding-free batches, which TRL itself refuses beside a custom collator):
    the rows are laid end to end in one sequence, position ids restarting at each, so no step computes
    padding; `last_prompt` then indexes that one sequence."""

    EXTRA = ("row_index", "supervised")

    def __init__(self, pad_token_id: int, preference: bool = False, padding_free: bool = False):
        if preference:
            self.inner = DataCollatorForPreference(pad_token_id=pad_token_id)
        else:
            self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=padding_free)
        self.preference, self.padding_free = preference, padding_free and not preference

    def __call__(self, examples: list[dict]) -> dict:
        rows = torch.tensor([example["row_index"] for example in examples])
        batch = self.inner([{k: v for k, v in e.items() if k not in self.EXTRA} for e in examples])
        batch["row_index"] = rows
        if self.preference:
            batch["last_prompt"] = last_prompt_positions(batch["completion_mask"][: len(examples)])
            return batch
        unsupervised = [not example.get("supervised", True) for example in examples]
        batch[ANY_SUPERVISED] = not all(unsupervised)  # every row has completion tokens (last_prompt_positions)
        if not self.padding_free:
            batch["last_prompt"] = last_prompt_positions(batch["labels"] != -100)
            batch["labels"][torch.tensor(unsupervised)] = -100
            return batch
        lengths = torch.tensor([len(example["input_ids"]) for example in examples])
        starts = torch.cumsum(lengths, 0) - lengths
        supervised = batch["labels"][0] != -100
        batch["last_prompt"] = torch.stack(
            [
                last_prompt_positions(supervised[None, s : s + n])[0] + s
                for s, n in zip(starts.tolist(), lengths.tolist())
            ]
        )
        for skip, s, n in zip(unsupervised, starts.tolist(), lengths.tolist()):
            if skip:
                batch["labels"][0, s : s + n] = -100
        return batch


def sequence_of_rows(positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Which sequence of `hidden` ([sequences, tokens, ...]) holds each row: the one shared sequence of a
    padding-free batch, else its own (in DPO's batch, the chosen half comes first)."""
    if hidden.shape[0] == 1:
        return torch.zeros(len(positions), dtype=torch.long, device=positions.device)
    return torch.arange(len(positions), device=positions.device)


def last_prompt_positions(supervised: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token in each row: one before the first supervised (completion) token.
    `supervised` is [rows, tokens], true on completion tokens (SFT: labels != -100; DPO: completion_mask)."""
    supervised = supervised.bool()
    if not supervised.any(dim=1).all():
        raise ValueError("a training row has no completion tokens; its last prompt token cannot be located")
    return supervised.float().argmax(dim=1) - 1


def metrics_to_host(metrics: dict[str, list]) -> None:
    """Replace, in place, each list of per-step device tensors in TRL's metrics (the loss terms' means) by
    floats, read back in one transfer. NaN marks a step without the term's rows: it is left out, and a term
    with no other step is dropped, as if never logged."""
    keys = [key for key, values in metrics.items() if values and torch.is_tensor(values[0])]
    if not keys:
        return
    flat = torch.stack([value.float() for key in keys for value in metrics[key]]).tolist()
    start = 0
    for key in keys:
        values = [value for value in flat[start : start + len(metrics[key])] if not math.isnan(value)]
        start += len(metrics[key])
        if values:
            metrics[key] = values
        else:
            del metrics[key]


class GeometryRegularized:
    """Mixin for a TRL trainer: the loss table's terms (train/losses/table.py) beside the trainer's own loss:
    keep / collapse / retain on the hidden state at the last prompt token (or the prompt's last few:
    regularizer.positions), onset and distill on the next-token logits there, each logged as `loss/<name>`.
    Only the terms with a non-zero weight run: a term at 0 is not computed, hooked or logged.

    The reference values live in `regularizer` (cached from the frozen model), so no second model is
    held in memory. In training each term is a mean over the global batch, as the language-modelling loss
    is: local sums are divided by the term's item count over the whole accumulation window and every
    process, scaled by the process count because DDP averages gradients, so N processes with k
    accumulation steps train the adapter one process would on the same global batch.

    A step reads one value back from the device (the finiteness of the loss and every term, together); the
    terms' logged means stay on the device until the Trainer logs.
    """

    def __init__(
        self,
        *args,
        regularizer: GeometryRegularizer | None = None,
        weights: LossWeights,
        onset: RefusalOnset | None = None,
        distill: FirstTokenDistill | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer.to(self.accelerator.device) if regularizer is not None else None
        self.onset = onset.to(self.accelerator.device) if onset is not None else None
        self.distill = distill.to(self.accelerator.device) if distill is not None else None
        self.weights = weights
        if self.weights.uses_geometry and regularizer is None:
            raise ValueError("keep, collapse or retain weight is set but the trainer was given no GeometryRegularizer")
        if self.weights.onset and onset is None:
            raise ValueError("onset_weight is set but the trainer was given no RefusalOnset")
        if self.weights.distill and distill is None:
            raise ValueError("distill_weight is set but the trainer was given no FirstTokenDistill")
        # compute_loss raises on a non-finite loss, so the Trainer's own filter of one could never act; it would
        # cost two reads from the device per step
        self.args.logging_nan_inf_filter = False
        self._window_counts: dict[str, torch.Tensor] | None = None  # set for each accumulation window

    @property
    def geometry_terms(self) -> tuple[str, ...]:
        """The regularizer's terms in the loss (non-zero weight), in logging order: the only ones computed."""
        return self.weights.active(GEOMETRY_TERMS) if self.regularizer is not None else ()

    @property
    def output_terms(self) -> dict[str, nn.Module]:
        """The output-side terms in the loss, by logged name: each reads the logits at the last prompt token."""
        modules = {"onset": self.onset, "distill": self.distill}
        return {term: modules[term] for term in self.weights.active(OUTPUT_TERMS) if modules[term] is not None}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's accumulation window, and each term's item count over all of it and every process."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        window: dict[str, torch.Tensor] = {}
        for batch in batches:
            for term, count in self._counts(batch["row_index"].to(device)).items():
                window[term] = window.get(term, 0) + count
        self._window_counts = self._reduce_sums(window)
        return batches, num_items_in_batch

    def _counts(self, row_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each running term's item count in these rows."""
        counts = self.regularizer.counts(self._items(row_index), self.geometry_terms) if self.geometry_terms else {}
        for term, module in self.output_terms.items():
            counts[term] = module.count(row_index)
        return counts

    def _reduce_sums(self, values: dict) -> dict:
        """Sums over every process, in one collective for all of them."""
        if not values:
            return {}
        summed = self.accelerator.reduce(torch.stack([v.detach().float() for v in values.values()]), "sum")
        return dict(zip(values, summed.unbind()))

    def _global(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, dict]:
        """Each term's sum and item count over every process, in one collective."""
        reduced = self._reduce_sums({(term, i): value for term, pair in terms.items() for i, value in enumerate(pair)})
        return {term: reduced[term, 0] for term in terms}, {term: reduced[term, 1] for term in terms}

    def _items(self, row_index: torch.Tensor) -> torch.Tensor:
        """The regularizer's items of these rows: one per row, or one per (row, prompt position)."""
        span = self.regularizer.positions
        return (row_index[:, None] * span + torch.arange(span, device=row_index.device)).flatten()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [column for column in RowIndexCollator.EXTRA if column not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    @contextmanager
    def _capture(self, model):
        """Hidden states of the first forward pass inside the block: the policy's. (DPO runs its reference
        forward after it, under no_grad, through the same modules.) Only what a running term reads is hooked."""
        unwrapped = self.accelerator.unwrap_model(model)
        blocks = decoder_layers(unwrapped)
        captured: dict = {}

        def keep(key, output) -> None:  # None: a hook's return value would replace the module's output
            captured.setdefault(key, output)

        hooks = [
            blocks[layer].register_forward_hook(lambda _m, _i, out, layer=layer: keep(layer, layer_output(out)))
            for layer in (self.regularizer.layers if self.geometry_terms else [])
        ]
        if self.output_terms:  # TRL's fused LM head builds no logits: keep the final hidden state instead
            hooks.append(backbone(unwrapped).register_forward_hook(lambda _m, _i, out: keep(FINAL, out[0])))
        try:
            yield captured
        finally:
            for hook in hooks:
                hook.remove()

    def _regularized(self, model, loss, captured, positions, row_index, num_items_in_batch):
        terms = self._terms(model, captured, positions, row_index.to(positions.device))
        window = self._window_counts if model.training else None  # None: a batch on its own (evaluation, tests)
        # The Trainer divides the loss by the accumulation steps unless it was normalised by num_items_in_batch;
        # a window mean must not be divided again.
        undo = (
            self.current_gradient_accumulation_steps
            if window is not None and not self._loss_scaled_for_accumulation(num_items_in_batch)
            else 1
        )
        global_sums, global_counts = self._global(terms)
        means = {term: global_sums[term] / global_counts[term].clamp_min(1) for term in terms}
        regularized = loss
        for term, (total, _) in terms.items():
            # clamped: a window without the term's rows adds a zero sum, not 0 / 0
            denominator = (global_counts[term] if window is None else window[term]).clamp_min(1)
            regularized = (
                regularized + self.weights.of(term) * total / denominator * self.accelerator.num_processes * undo
            )
        self._check_finite(loss, means, regularized)
        mode = "train" if model.training else "eval"
        for term, mean in means.items():  # NaN marks a step without the term's rows: log leaves it out
            self._metrics[mode][TERMS[term].metric].append(torch.where(global_counts[term] > 0, mean, torch.nan))
        return regularized

    def _terms(self, model, captured, positions, row_index) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each running term's (local sum, local item count) on this batch."""
        terms = {}
        if self.geometry_terms:
            hidden = self._prompt_hidden(captured, positions)
            terms.update(self.regularizer(hidden, self._items(row_index), self.geometry_terms))
        if self.output_terms:
            logits = self._first_answer_logits(model, captured[FINAL], positions)
            for term, module in self.output_terms.items():
                terms[term] = module(logits, row_index)
        return terms

    def _prompt_hidden(self, captured: dict, positions: torch.Tensor) -> torch.Tensor:
        """[items, Lr, d]: the regularizer's layers at the last `span` prompt tokens of each row, earliest first."""
        span = self.regularizer.positions
        offsets = torch.arange(span, device=positions.device)
        tokens = positions[:, None] - (span - 1) + offsets  # [rows, span]
        batch = sequence_of_rows(positions, captured[self.regularizer.layers[0]])[:, None]
        hidden = torch.stack([captured[layer][batch, tokens] for layer in self.regularizer.layers], dim=2)
        return hidden.flatten(0, 1)

    def _check_finite(self, loss: torch.Tensor, means: dict[str, torch.Tensor], regularized: torch.Tensor) -> None:
        """Stop before the optimizer spreads a NaN into the adapter. One read from the device per step, of
        every value at once; the failing value is looked up only then."""
        values = [loss.detach().float().reshape(-1), *(m.reshape(1) for m in means.values())]
        if bool(torch.isfinite(torch.cat([*values, regularized.detach().float().reshape(-1)])).all()):
            return
        where = f"at step {self.state.global_step + 1} (learning_rate {self.args.learning_rate})"
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"the training loss is {loss.detach().float().mean().item()} {where}; "
                "lower the learning rate or check the batch's rows"
            )
        for term, mean in means.items():
            if not torch.isfinite(mean):
                layers = f", layers {self.regularizer.layers}" if term in GEOMETRY_TERMS else ""
                raise FloatingPointError(f"regularizer term {term!r} is not finite ({mean.item()}) {where}{layers}")
        raise FloatingPointError(
            f"the regularized training loss is {regularized.detach().float().mean().item()} {where}; "
            "lower the learning rate or the term weights"
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log averages each list in self._metrics; the terms' per-step means wait there on the device
        and are read back here, all in one transfer, as floats (a step without a term's rows is left out)."""
        metrics_to_host(self._metrics["train" if self.model.training else "eval"])
        super().log(logs, start_time)

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Transformers' Trainer.training_step's own rule for whether it divides the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _first_answer_logits(self, model, final_hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits at each row's last prompt token: the distribution of the answer's first token."""
        hidden = final_hidden[sequence_of_rows(positions, final_hidden), positions]
        return output_logits(self.accelerator.unwrap_model(model), hidden)


class RefcalSFTTrainer(GeometryRegularized, SFTTrainer):
    """TRL's SFTTrainer plus the geometry regularizer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row_index, positions = inputs.pop("row_index"), inputs.pop("last_prompt")
        any_supervised = inputs.pop(ANY_SUPERVISED, None)
        with self._capture(model) as captured:
            if self._any_process_has_labels(inputs["labels"], any_supervised):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:  # only target-free rows: no language-modelling loss, the regularizer alone
                # no cache, as TRL's loss does: with one, a padding-free batch's rows would attend to each other
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
                result = (outputs.logits.sum() * 0, outputs)
        loss = result[0] if isinstance(result, tuple) else result
        loss = self._regularized(model, loss, captured, positions, row_index, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss

    def _any_process_has_labels(self, labels: torch.Tensor, local: bool | None = None) -> bool:
        """Every process takes the same branch: TRL's loss gathers its metrics across processes, so one
        process skipping it while another enters it would wait forever. TRL's loss of a batch without
        labels is a finite zero. `local`: whether this process's batch has labels, as the collator knew on the
        host; None (a batch from elsewhere) reads it from the labels. One process needs no read from the
        device then; several share theirs in one reduce, read back."""
        if local is not None and self.accelerator.num_processes == 1:
            return local
        if local is None:
            has_labels = (labels != -100).any().float().reshape(1)
        else:
            has_labels = torch.full((1,), float(local), device=labels.device)
        if self.accelerator.num_processes > 1:
            has_labels = self.accelerator.reduce(has_labels, "sum")
        return bool(has_labels.item() > 0)


class RefcalDPOTrainer(GeometryRegularized, DPOTrainer):
    """TRL's DPOTrainer plus the geometry regularizer. A batch of n preference pairs runs as 2n rows,
    chosen then rejected, with the same prompt in both halves: the chosen half carries the prompt's
    last-token state."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row_index, positions = inputs.pop("row_index"), inputs.pop("last_prompt", None)
        if positions is None:  # a batch not from RowIndexCollator: locate them here
            positions = last_prompt_positions(inputs["completion_mask"][: len(row_index)])
        with self._capture(model) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = self._regularized(model, loss, captured, positions, row_index, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss
