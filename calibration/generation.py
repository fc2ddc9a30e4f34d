"""Batched greedy generation of chat responses, optionally with the residual stream at each prompt's last
token, read off the generation's own prefill (no second forward pass over the prompts).

Two things make it cheaper than `model.generate` on the same batches (token for token the same answers
in float32; in bf16 the shared prefix is rounded in another order, and answers can part after a few tokens):
- the tokens every prompt starts with (the chat template's header, often a default system prompt: 24 of
  SmolLM2's 52 tokens on an average demo prompt) are run once and their keys and values shared by every
  batch; the prompts' own tokens follow after their left padding, with positions that continue the prefix;
- the prompt pass runs in groups of rows of similar length, each padded only to its own longest, and their
  keys and values are laid into the batch's cache as one pass would have left them (of a length-sorted
  batch of 64 eval prompts, half the tokens one pass computed were padding);
- a row leaves its batch at its end of turn, so finished answers cost nothing while longer ones go on;
- each batch's keys and values are written into buffers sized for its longest answer, where a growing
  cache would copy all of them at every token (4-6% of a generation's time on a CPU).
Models whose generation config asks for more than the argmax (a repetition penalty, banned words, a
minimum length), whose forward takes no cache, or with layers other than attention (recurrent state cannot
be shared this way) go through `model.generate` instead."""

from __future__ import annotations

import copy
import inspect

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from refcal.calibration.activations import NonFiniteActivations, chat_prompts, encode_left_padded, layer_output
from refcal.calibration.infra.batching import shrinking_batches
from refcal.calibration.infra.profiling import note, section
from refcal.calibration.infra.sharding import Processes, gather_items, my_batches, one_process, shares
from refcal.calibration.models import decoder_layers, dtype_name

# generation-config fields that change greedy decoding away from the plain argmax, with their neutral values
_ARGMAX_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
}


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    desc: str = "generate",
    progress: bool = True,
    processes: Processes | None = None,
) -> list[str]:
    """Greedy responses, one per prompt, in order. Prompts are sorted by length so batches pad little;
    batch_size is the largest tried (halved on out-of-memory). With `processes` (Accelerate's state under a
    launch of several), each process generates its share of the batches and every process gets all answers."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress, None, processes)[0]


def generate_with_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    desc: str = "generate",
    progress: bool = True,
    processes: Processes | None = None,
) -> tuple[list[str], torch.Tensor]:
    """`generate`, plus the residual stream after every decoder layer at each prompt's last token:
    [n_prompts, n_layers, hidden] float32 on the CPU, in the model's own dtype's precision, checked finite.
    The prefill computes exactly these states (left padding puts every last prompt token at position -1),
    so they cost no forward pass of their own."""
    blocks = decoder_layers(model)
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress, blocks, processes)


def plain_argmax(model: PreTrainedModel) -> bool:
    """Whether greedy decoding with this model's generation config is the argmax at every step (no logits
    processor changes it), its forward takes a cache and every layer is attention: what refcal's own
    decoding loop computes."""
    config = model.generation_config
    neutral = all(getattr(config, name, None) in values for name, values in _ARGMAX_NEUTRAL.items())
    return neutral and prefix_cacheable(model, 0)


def prefix_cacheable(model: PreTrainedModel, longest: int) -> bool:
    """Whether the prompts' shared prefix can run once and its keys and values serve every batch: the
    forward takes a cache and every layer is attention (a recurrent state could not be shared this way).
    A sliding window (where the config sets one) must hold the longest sequence: the padding between the
    prefix and a prompt's own tokens would otherwise push prefix tokens out of the window that the unpadded
    prompt keeps them in."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    window = getattr(config, "sliding_window", None)
    attention_only = set(layer_types) <= {"full_attention", "sliding_attention"}
    return cache_keyword(model) is not None and attention_only and (window is None or longest < window)


def cache_keyword(model: PreTrainedModel) -> str | None:
    """The name the model's forward takes its key-value cache under (a PEFT wrapper passes it on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def forward_after_prefix(model, keyword: str, input_ids, mask, cache, **kwargs) -> torch.Tensor:
    """The next-token logits at the last position ([b, vocab]) of a forward that continues `cache`: `mask`
    covers the cached prefix, then each row's left padding and own tokens, and the positions continue the
    prefix past the padding, as if the prompt had none."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    output = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache}, **kwargs
    )
    return output.logits[:, -1]


def prefix_cache(model, keyword: str, prefix_ids: torch.Tensor) -> DynamicCache:
    """Keys and values of a shared prefix ([1, p]) under the model's current hooks."""
    cache = DynamicCache(config=model.config)  # sliding-window layers where the model has them
    forward_after_prefix(model, keyword, prefix_ids, torch.ones_like(prefix_ids), cache, logits_to_keep=1)
    return cache


def shared_prefix_length(token_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one of its own."""
    if not token_ids:
        return 0
    first = token_ids[0]
    length = min(len(ids) for ids in token_ids) - 1
    for ids in token_ids[1:]:
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    return max(length, 0)


@torch.inference_mode()
def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress, blocks, processes):
    texts = chat_prompts(tokenizer, prompts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    # this process's batches of the length-sorted prompts, laid end to end
    mine = [
        position for start, stop in my_batches(len(order), batch_size, processes) for position in range(start, stop)
    ]
    device = next(model.parameters()).device
    decoder = None
    if plain_argmax(model):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prefix_cacheable(model, max(map(len, ids), default=0) + max_new_tokens):
            decoder = _SharedPrefixGreedy(model, tokenizer, ids, device)
    prefill: dict[int, list[torch.Tensor]] = {}  # per layer, the prompt pass's last positions, call by call
    recording = [False]

    def keep_prefill(layer: int):
        def hook(_module, _inputs, output):
            if recording[0]:
                prefill.setdefault(layer, []).append(layer_output(output)[:, -1].float().cpu())

        return hook

    def answer(start: int, stop: int) -> tuple[list[list[int]], torch.Tensor | None]:
        batch = [order[mine[i]] for i in range(start, stop)]
        prefill.clear()  # a batch retried after out-of-memory starts again
        if decoder is not None:
            sequences, passed = decoder(batch, max_new_tokens, recording)
        else:
            sequences = _hf_generate(model, tokenizer, [texts[i] for i in batch], max_new_tokens, device, recording)
            passed = list(range(len(batch)))
        if blocks is None:
            return sequences, None
        in_pass_order = torch.stack([torch.cat(prefill[layer]) for layer in range(len(blocks))], dim=1)
        states = torch.empty_like(in_pass_order)
        states[passed] = in_pass_order
        return sequences, states

    items: list[tuple[int, tuple[str, torch.Tensor | None]]] = []
    hooks = [] if blocks is None else [block.register_forward_hook(keep_prefill(i)) for i, block in enumerate(blocks)]
    show = progress and (one_process(processes) or processes.is_main_process)
    try:
        with section(f"generation: {desc}"):
            for start, _, (completions, states) in shrinking_batches(len(mine), batch_size, answer, desc, show):
                for j, sequence in enumerate(completions):
                    text = tokenizer.decode(sequence, skip_special_tokens=True).strip()
                    items.append((order[mine[start + j]], (text, None if states is None else states[j])))
            gathered = gather_items(items, len(texts), processes)
            note(
                prompts=len(texts),
                prompts_per_process=shares(len(texts), batch_size, processes),
                device=device.type,
                dtype=dtype_name(model),
                batch_size=batch_size,
            )
    finally:
        for hook in hooks:
            hook.remove()
    responses = [text for text, _ in gathered]
    if blocks is None:
        return responses, None
    activations = (
        torch.stack([state for _, state in gathered])
        if gathered
        else torch.empty(0, len(blocks), model.config.hidden_size)
    )
    if not torch.isfinite(activations).all():
        bad = torch.nonzero(~torch.isfinite(activations))
        rows, layers = sorted(set(bad[:, 0].tolist())), sorted(set(bad[:, 1].tolist()))
        raise NonFiniteActivations(f"non-finite activations at layer(s) {layers}", rows, layers)
    return responses, activations


def _hf_generate(model, tokenizer, texts, max_new_tokens, device, recording) -> list[list[int]]:
    batch = encode_left_padded(tokenizer, texts, device)
    first_pass = [True]

    def record_first_pass(_module, _args, _kwargs):  # the prompt's pass, not a one-token decoding step
        recording[0], first_pass[0] = first_pass[0], False

    handle = model.register_forward_pre_hook(record_first_pass, with_kwargs=True)
    try:
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        handle.remove()
        recording[0] = False
    return output[:, batch["input_ids"].shape[1] :].tolist()


class _SharedPrefixGreedy:
    """Greedy decoding of batches of prompts (by index into `ids`, their tokens) over one cached run of their
    shared prefix."""

    @torch.inference_mode()
    def __init__(self, model, tokenizer, ids: list[list[int]], device):
        self.model, self.device = model, device
        self.keyword = cache_keyword(model)
        self.prefix = shared_prefix_length(ids)
        self.rest = [row[self.prefix :] for row in ids]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stop = model.generation_config.eos_token_id
        stop = tokenizer.eos_token_id if stop is None else stop
        self.stop = torch.tensor(stop if isinstance(stop, list) else [stop], device=device)
        if self.prefix:
            self.prefix_cache = prefix_cache(model, self.keyword, torch.tensor([ids[0][: self.prefix]], device=device))
        else:  # nothing shared: each batch's forward fills its own copy of an empty cache
            self.prefix_cache = DynamicCache(config=model.config)
        # groups of similar length can run the prompt pass apart where every layer keeps all its keys
        self.groupable = all(type(layer) is DynamicLayer for layer in self.prefix_cache.layers)

    def _forward(self, input_ids, mask, cache, **kwargs) -> torch.Tensor:
        return forward_after_prefix(self.model, self.keyword, input_ids, mask, cache, **kwargs)

    @torch.inference_mode()
    def __call__(
        self, batch: list[int], max_new_tokens: int, recording: list[bool]
    ) -> tuple[list[list[int]], list[int]]:
        """The batch's answers, and the order its rows went through the prompt pass (the order in which the
        recording hooks saw them)."""
        rest = [self.rest[i] for i in batch]
        width = max(len(r) for r in rest)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rest], device=self.device)
        own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=self.device)
        mask = torch.cat([own.new_ones(len(batch), self.prefix), own], dim=1)
        capacity = mask.shape[1] + max_new_tokens
        groups = prefill_groups([len(r) for r in rest]) if self.groupable else []
        if len(groups) < 2:  # one pass over the batch as it stands
            groups = [list(range(len(batch)))]
        recording[0] = True
        try:
            if len(groups) == 1:
                cache = self._batch_cache(len(batch))
                preallocate(cache, capacity)
                logits = self._forward(ids, mask, cache, logits_to_keep=1)
            else:
                logits, cache = self._grouped_prompt_pass(ids, mask, [len(r) for r in rest], groups, capacity)
        finally:
            recording[0] = False
        answers: list[list[int]] = [[] for _ in batch]
        alive = list(range(len(batch)))  # the rows still in the batch, on the host
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            # the step's one read back: each row's token and whether it ended its turn
            tokens, stopped = torch.stack([token, torch.isin(token, self.stop).long()]).tolist()
            for row, t in zip(alive, tokens):
                answers[row].append(t)
            going = [i for i, ended in enumerate(stopped) if not ended]
            if step == max_new_tokens - 1 or not going:
                break
            if len(going) < len(alive):  # finished rows leave the batch and its cache
                keep = torch.tensor(going, device=self.device)
                cache.batch_select_indices(keep)
                alive, token, mask = [alive[i] for i in going], token[keep], mask[keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            logits = self._forward(token[:, None], mask, cache)
        return answers, [row for group in groups for row in group]

    def _batch_cache(self, rows: int) -> DynamicCache:
        cache = copy.deepcopy(self.prefix_cache)
        if self.prefix:
            cache.batch_repeat_interleave(rows)
        return cache

    def _grouped_prompt_pass(self, ids, mask, lengths: list[int], groups: list[list[int]], capacity: int):
        """The prompt pass in groups of rows of similar length, each padded only to its own longest, then
        their keys and values laid into one batch cache as if the batch had run as one: each row's prefix,
        its left padding (zeros, masked), its own tokens. Positions follow the mask, so they match too."""
        width = ids.shape[1]
        logits = None
        layers = [_PreallocatedLayer.empty(capacity) for _ in self.prefix_cache.layers]
        for group in groups:
            rows = torch.tensor(group, device=self.device)
            own = max(lengths[row] for row in group)
            group_mask = torch.cat([mask[rows, : self.prefix], mask[rows, width + self.prefix - own :]], dim=1)
            cache = self._batch_cache(len(group))
            group_logits = self._forward(ids[rows, width - own :], group_mask, cache, logits_to_keep=1)
            if logits is None:
                logits = group_logits.new_empty(len(ids), group_logits.shape[-1])
            logits[rows] = group_logits
            for layer, filled in zip(layers, cache.layers):
                layer.place(rows, filled.keys, filled.values, len(ids), self.prefix, width - own)
        cache = copy.copy(self.prefix_cache)  # the cache's kind, with the batch's layers
        cache.layers = layers
        return logits, cache


def prefill_groups(lengths: list[int], call_cost: int = 64) -> list[list[int]]:
    """Rows (indices into `lengths`) in groups for the prompt pass: contiguous in length order, chosen to
    minimise the tokens computed (each group's rows times its longest prompt, padding included) plus
    `call_cost` tokens per forward call (a call reads every weight, however few its rows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [None] * len(order)  # best[j]: the cheapest cost of the first j rows in length order
    cut = [0] * (len(order) + 1)
    for stop in range(1, len(order) + 1):
        longest = lengths[order[stop - 1]]
        best[stop], cut[stop] = min(
            (best[start] + (stop - start) * longest + call_cost, start) for start in range(stop)
        )
    groups, stop = [], len(order)
    while stop:
        groups.append(order[cut[stop] : stop])
        stop = cut[stop]
    return groups[::-1]


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer that writes new keys and values into buffers of a fixed capacity and
    hands out views of the filled part: the same tensors a `DynamicLayer` returns, without concatenating
    the whole cache at every step."""

    @classmethod
    def holding(cls, layer: DynamicLayer, capacity: int) -> _PreallocatedLayer:
        grown = cls()
        grown.capacity, grown.length = capacity, 0
        if layer.is_initialized and layer.get_seq_length():
            grown._allocate(layer.keys, layer.values)
            grown._write(layer.keys, layer.values)
        return grown

    @classmethod
    def empty(cls, capacity: int) -> _PreallocatedLayer:
        layer = cls()
        layer.capacity, layer.length = capacity, 0
        return layer

    def place(self, rows, keys: torch.Tensor, values: torch.Tensor, batch: int, prefix: int, padding: int) -> None:
        """Lay a group's prompt pass (`keys` [g, heads, prefix + own, dim]) into `rows` of a batch whose
        rows are `padding` positions wider than the group's: prefix, zeros where the batch pads, own tokens."""
        if not self.is_initialized:
            self.device, self.is_initialized = keys.device, True
            shape = (batch, keys.shape[1], self.capacity, keys.shape[-1])
            self.key_buffer, self.value_buffer = keys.new_zeros(shape), values.new_zeros(shape)
        stop = keys.shape[-2] + padding
        for buffer, filled in ((self.key_buffer, keys), (self.value_buffer, values)):
            buffer[rows, :, :prefix] = filled[:, :, :prefix]
            buffer[rows, :, prefix + padding : stop] = filled[:, :, prefix:]
        self.length = stop
        self._show_filled()

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.device, self.is_initialized = keys.device, True
        self.key_buffer = keys.new_empty(*keys.shape[:-2], self.capacity, keys.shape[-1])
        self.value_buffer = values.new_empty(*values.shape[:-2], self.capacity, values.shape[-1])

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        stop = self.length + keys.shape[-2]
        if stop > self.capacity:
            raise RuntimeError(f"cache of {self.capacity} positions asked to hold {stop}")
        self.key_buffer[..., self.length : stop, :] = keys
        self.value_buffer[..., self.length : stop, :] = values
        self.length = stop
        self._show_filled()

    def _show_filled(self) -> None:
        self.keys, self.values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self._allocate(key_states, value_states)
        self._write(key_states, value_states)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._show_filled()


def preallocate(cache: DynamicCache, capacity: int) -> None:
    """Give each full-attention layer of `cache` room for `capacity` positions (its prefix included);
    sliding-window and other layers keep their own kind."""
    cache.layers = [
        _PreallocatedLayer.holding(layer, capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
