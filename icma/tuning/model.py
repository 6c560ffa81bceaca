"""The model being tuned: base model and tokenizer, precision, LoRA layers or full weights."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from typing import TYPE_CHECKING

from icma.core.errors import InputError

if TYPE_CHECKING:  # not at run time: this module loads without pydantic (icma.tuning)
    from icma.tuning.config import TuneConfig

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    from icma.generation.engines.hf import pick_device as engine_device

    return engine_device(device)


def pick_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if precision == "float16" and device == "cpu":
        raise InputError("float16 training needs a GPU; use float32 or bfloat16 on the CPU",
                         field="precision")
    if precision == "bfloat16" and device == "cpu":
        from icma.evaluation.machine import cpu_has_fast_bf16

        if not cpu_has_fast_bf16():
            log.warning("precision bfloat16 on a CPU without AMX or AVX512-BF16: torch falls "
                        "back to a slow bfloat16 matmul (0.1 against float32's 7.1 GFLOP/s on "
                        "an AVX2 AMD EPYC, benchmarks/results/matmul_amd-epyc.md); use "
                        "precision float32 here")
    return precision


def load_tokenizer(path: str, base_model: str):
    """The tokenizer of the model folder (or hub id) ``path``, called ``base_model`` in
    messages."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer from {base_model!r}: {exc}",
                         field="base_model") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise InputError(f"{base_model}: the tokenizer has neither a pad nor an EOS token",
                         field="base_model")
    return tok


def config_eos_id(path: str) -> int | None:
    """The EOS id in the config of the model at ``path`` (tokenizers such as BERT's have none
    of their own)."""
    from transformers import AutoConfig

    try:
        eos = AutoConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        return None
    return eos[0] if isinstance(eos, list) and eos else eos


def load_model(cfg: TuneConfig, path: str, device: str, precision: str):
    """The base model (its folder or hub id ``path``) ready to train: float32 master weights
    (mixed precision comes from autocast in the loop) or, for quantised LoRA, 8/4-bit weights
    on the GPU. Under bfloat16/float16 LoRA the frozen Linear weights are stored in that type
    at once (see ``store_frozen_in``)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if cfg.quantization != "none":
        if not device.startswith("cuda"):
            raise InputError("8/4-bit loading needs a GPU (bitsandbytes); this run is on the "
                             "CPU", field="quantization")
        from transformers import BitsAndBytesConfig

        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_8bit=cfg.quantization == "8bit", load_in_4bit=cfg.quantization == "4bit",
            bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": device}}
    try:
        net = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load {cfg.base_model!r} as a causal language model: {exc}",
                         field="base_model") from None
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        net = prepare_model_for_kbit_training(net)
    else:
        net = net.to(device)
    net.config.use_cache = False  # no generation while training
    if cfg.method == "lora":
        net = add_lora(net, cfg)
        if cfg.quantization == "none" and precision in ("bfloat16", "float16"):
            store_frozen_in(net, precision)
    return net


def store_frozen_in(net, dtype_name: str) -> int:
    """Cast the frozen weights of Linear layers to the autocast type; returns how many.

    Autocast casts a float32 weight to bfloat16 in every forward pass (and keeps the copy for
    the backward one) unless the weight requires a gradient: for LoRA's frozen base layers that
    was a fifth of a CPU step, for weights that never change. Autocast computes the same
    matrix products from a weight already in that type, so the results are identical. Only
    Linear weights are cast (autocast runs those in the reduced type anyway); norms,
    embeddings and the (often tied) output head keep float32, as the loop's head does its
    own cast once per run (``loop._head_split``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    head = net.get_output_embeddings()
    n = 0
    for module in net.modules():
        if isinstance(module, torch.nn.Linear) and module is not head \
                and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
            n += 1
    return n


def fast_dropout(p: float):
    """``nn.Dropout(p)`` drawing its mask from 15-bit random integers (``_uniform15``) instead of
    ``bernoulli_``, which on the CPU is several times slower than the matrix product it feeds
    (peft draws one mask per LoRA layer per pass: 210 a step on SmolLM2). The keep probability
    is ``1 - round(p * 2**15) / 2**15`` (within 2e-5 of ``1 - p``), the scale its inverse; the
    draw comes from torch's default generator, so checkpoints resume it exactly."""
    import torch

    class _FastDropout(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p
            self.threshold = round(p * 32768)
            self.scale = 32768 / (32768 - self.threshold)

        def forward(self, x):
            if not self.training or self.threshold == 0:
                return x
            return _masked_scale(x, _uniform15(x) >= self.threshold, self.scale)

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return _FastDropout(p)


def _uniform15(x):
    """A tensor of ``x``'s shape of independent uniform integers in [0, 32768). Drawn as 64-bit
    words cut into four 16-bit lanes with the sign bit cleared: a quarter of the generator's
    calls of one draw per element, and the mask is most of dropout's
    cost (each lane's bits are uniform, and a test checks the keep rate)."""
    import torch

    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    return words.view(torch.int16)[:n].view(x.shape) & 0x7FFF


def _masked_scale(x, keep, scale: float):
    import torch

    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


def lora_targets(net) -> list[str]:
    """Every Linear layer but the output head, by the names peft matches (ICMA's rule; on
    Llama/Mistral q,k,v,o,gate,up,down, on OPT/Galactica q,k,v,out_proj,fc1,fc2)."""
    import torch

    head = net.get_output_embeddings()
    names = set()
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
        elif type(module).__name__ in ("Linear8bitLt", "Linear4bit") and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise InputError("the base model has no Linear layers besides its output head to put "
                         "LoRA on; give target_modules", field="target_modules")
    return sorted(names)


def add_lora(net, cfg: TuneConfig):
    from peft import LoraConfig, get_peft_model

    available = lora_targets(net)
    targets = cfg.target_modules or available
    missing = sorted(set(targets) - set(available))
    if missing:
        raise InputError(f"no Linear layers named {', '.join(missing)} in the base model; it "
                         f"has {', '.join(available)}", field="target_modules")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        bias="none", target_modules=targets, task_type="CAUSAL_LM")
    net = get_peft_model(net, config)
    _speed_up_dropout(net)
    return net


def _speed_up_dropout(net) -> None:
    import torch

    for module in net.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key, drop in drops.items():
                if type(drop) is torch.nn.Dropout and drop.p > 0:
                    drops[key] = fast_dropout(drop.p)


def trainable(net) -> dict:
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def count_parameters(net) -> dict:
    total = sum(p.numel() for p in net.parameters())
    train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"total": total, "trainable": train}


def folder_checksum(path: str | Path) -> str:
    """SHA-256 over a model folder's weight and config files (names and bytes), so a manifest
    names exactly the base model an adapter was trained on."""
    folder = Path(path)
    if not folder.is_dir():  # a hub id: the name is all there is locally
        return "hub:" + str(path)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json", ".model", ".txt")):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
