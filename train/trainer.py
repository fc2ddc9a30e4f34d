"""RefcalSFTTrainer and RefcalDPOTrainer: TRL's trainers plus the geometry regularizer on captured hidden states."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from trl import DPOTrainer, SFTTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from refcal.calibration.activations import backbone, layer_output
from refcal.calibration.models import decoder_layers
from refcal.train.losses import LossWeights
from refcal.train.onset import RefusalOnset
from refcal.train.regularizer import GeometryRegularizer
from refcal.train.self_distill import FirstTokenGuard

GEOMETRY_TERMS = ("keep", "collapse", "retain")  # always logged
FINAL = "final"  # the captured key of the backbone's output (the final norm's), for the output-side terms


class RowIndexCollator:
    """A TRL collator (language modelling, or preference pairs), carrying each example's `row_index`
    through as a tensor.

    Language modelling batches also carry `last_prompt` (each row's last prompt token), and rows whose
    `supervised` is false have their labels masked: their completion only marks where the prompt ends,
    so the regularizer acts on them without an answer target (objective: target_free).

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
            return batch
        unsupervised = [not example.get("supervised", True) for example in examples]
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


class GeometryRegularized:
    """Mixin for a TRL trainer: weighted keep / collapse / retain terms on the hidden state at the last
    prompt token (or the prompt's last few: regularizer.positions), and optionally two output-side terms on
    the logits there: the refusal-onset term (train/onset.py) and the self-distillation guard
    (train/self_distill.py), each logged every step.

    The reference values live in `regularizer` (cached from the frozen model), so no second model is
    held in memory. In training each term is a mean over the global batch, as the language-modelling loss
    is: local sums are divided by the term's item count over the whole accumulation window and every
    process, scaled by the process count because DDP averages gradients, so N processes with k
    accumulation steps train the adapter one process would on the same global batch.
    """

    def __init__(
        self,
        *args,
        regularizer: GeometryRegularizer,
        weights: LossWeights,
        onset: RefusalOnset | None = None,
        guard: FirstTokenGuard | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer.to(self.accelerator.device)
        self.onset = onset.to(self.accelerator.device) if onset is not None else None
        self.guard = guard.to(self.accelerator.device) if guard is not None else None
        self.weights = weights
        if self.weights.onset and onset is None:
            raise ValueError("onset_weight is set but the trainer was given no RefusalOnset")
        if self.weights.distill and guard is None:
            raise ValueError("distill_weight is set but the trainer was given no FirstTokenGuard")
        self._window_counts: dict[str, torch.Tensor] | None = None  # set for each accumulation window

    @property
    def output_terms(self) -> dict[str, nn.Module]:
        """The output-side terms in use, by logged name: each reads the logits at the last prompt token."""
        return {term: module for term, module in (("onset", self.onset), ("distill", self.guard)) if module is not None}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's accumulation window, and each term's item count over all of it and every process."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        window: dict[str, torch.Tensor] = {}
        for batch in batches:
            row_index = batch["row_index"].to(device)
            counts = self.regularizer.counts(self._items(row_index))
            for term, module in self.output_terms.items():
                counts[term] = module.count(row_index)
            for term, count in counts.items():
                window[term] = window.get(term, 0) + count
        self._window_counts = {term: self.accelerator.reduce(count, "sum") for term, count in window.items()}
        return batches, num_items_in_batch

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
        forward after it, under no_grad, through the same modules.)"""
        unwrapped = self.accelerator.unwrap_model(model)
        blocks = decoder_layers(unwrapped)
        captured: dict = {}
        hooks = [
            blocks[layer].register_forward_hook(
                lambda _m, _i, out, layer=layer: captured.setdefault(layer, layer_output(out))
            )
            for layer in self.regularizer.layers
        ]
        if self.output_terms:  # TRL's fused LM head builds no logits: keep the final hidden state instead

            def keep_final(_module, _inputs, out):  # returns None: the output passes through unchanged
                captured.setdefault(FINAL, out[0])

            hooks.append(backbone(unwrapped).register_forward_hook(keep_final))
        try:
            yield captured
        finally:
            for hook in hooks:
                hook.remove()

    def _regularized(self, model, loss, captured, positions, row_index, num_items_in_batch):
        if not torch.isfinite(loss.detach()).all():  # stop before the optimizer spreads it into the adapter
            raise FloatingPointError(
                f"the training loss is {loss.detach().float().mean().item()} at step {self.state.global_step + 1} "
                f"(learning_rate {self.args.learning_rate}); lower the learning rate or check the batch's rows"
            )
        span = self.regularizer.positions  # the last `span` prompt tokens of each row, earliest first
        offsets = torch.arange(span, device=positions.device)
        tokens = positions[:, None] - (span - 1) + offsets  # [rows, span]
        batch = sequence_of_rows(positions, captured[self.regularizer.layers[0]])[:, None]
        hidden = torch.stack([captured[layer][batch, tokens] for layer in self.regularizer.layers], dim=2)
        terms = self.regularizer(hidden.flatten(0, 1), self._items(row_index.to(positions.device)))
        if self.output_terms:
            logits = self._first_answer_logits(model, captured[FINAL], positions)
            for term, module in self.output_terms.items():
                terms[term] = module(logits, row_index.to(positions.device))

        mode = "train" if model.training else "eval"
        window = self._window_counts if model.training else None  # None: a batch on its own (evaluation, tests)
        # The Trainer divides the loss by the accumulation steps unless it was normalised by num_items_in_batch;
        # a window mean must not be divided again.
        undo = (
            self.current_gradient_accumulation_steps
            if window is not None and not self._loss_scaled_for_accumulation(num_items_in_batch)
            else 1
        )
        for term, (total, count) in terms.items():
            global_total = self.accelerator.reduce(total.detach().clone(), "sum")
            global_count = self.accelerator.reduce(count.clone(), "sum")
            value = (global_total / global_count.clamp_min(1)).item()
            if not torch.isfinite(torch.tensor(value)):
                raise FloatingPointError(
                    f"regularizer term {term!r} is not finite ({value}) at layers {self.regularizer.layers}"
                )
            if global_count > 0:
                self._metrics[mode][f"reg_{term}"].append(value)
            denominator = global_count if window is None else window[term]
            weight = self.weights.of(term)
            if weight and global_count > 0:
                loss = loss + weight * total / denominator * self.accelerator.num_processes * undo
        return loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Transformers' Trainer.training_step's own rule for whether it divides the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _first_answer_logits(self, model, final_hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits at each row's last prompt token: the distribution of the answer's first token."""
        unwrapped = self.accelerator.unwrap_model(model)
        hidden = final_hidden[sequence_of_rows(positions, final_hidden), positions]
        logits = unwrapped.get_output_embeddings()(hidden)
        cap = getattr(unwrapped.config.get_text_config(), "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits


class RefcalSFTTrainer(GeometryRegularized, SFTTrainer):
    """TRL's SFTTrainer plus the geometry regularizer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row_index, positions = inputs.pop("row_index"), inputs.pop("last_prompt")
        with self._capture(model) as captured:
            if self._any_process_has_labels(inputs["labels"]):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:  # only target-free rows: no language-modelling loss, the regularizer alone
                # no cache, as TRL's loss does: with one, a padding-free batch's rows would attend to each other
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
                result = (outputs.logits.sum() * 0, outputs)
        loss = result[0] if isinstance(result, tuple) else result
        loss = self._regularized(model, loss, captured, positions, row_index, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss

    def _any_process_has_labels(self, labels: torch.Tensor) -> bool:
        """Every process takes the same branch: TRL's loss gathers its metrics across processes, so one
        process skipping it while another enters it would wait forever. TRL's loss of a batch without
        labels is a finite zero."""
        has_labels = (labels != -100).any().float().reshape(1)
        if self.accelerator.num_processes > 1:
            has_labels = self.accelerator.reduce(has_labels, "sum")
        return bool(has_labels.item() > 0)


class RefcalDPOTrainer(GeometryRegularized, DPOTrainer):
    """TRL's DPOTrainer plus the geometry regularizer. A batch of n preference pairs runs as 2n rows,
    chosen then rejected, with the same prompt in both halves: the chosen half carries the prompt's
    last-token state."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row_index = inputs.pop("row_index")
        chosen = inputs["completion_mask"][: len(row_index)]
        with self._capture(model) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = self._regularized(model, loss, captured, last_prompt_positions(chosen), row_index, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss
