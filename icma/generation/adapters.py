"""The adapter registry: a directory with one peft LoRA folder per adapter, served by name.

The directory is read on every lookup (a listing of a few folders), so an adapter saved into it
by ``icma tune`` or copied in by hand is served at once, without restarting the worker. An
optional ``icma-adapter.json`` manifest in the folder (written by tuning) says what the adapter
was trained for.

Adapters shipped with icma (``icma/data/adapters/<name>/``, ``ICMA_SHIPPED_ADAPTERS_DIR``) are
read in place, from the installed package, as a second, read-only layer below the registry: an
upgrade of the package brings its new adapters without touching the operator's folder, and a
folder of the same name in the registry wins over a shipped one (an upgrade never hides an
operator's adapter). A shipped adapter whose manifest says ``"default": true`` is what a request
that names no adapter gets for its task (``DefaultAdapters``); ``ICMA_DEFAULT_ADAPTERS``
overrides that per task. ``base`` names the untuned model and is never an adapter's name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from icma.generation.engines import BOUNDS, DECODINGS, Adapter
from icma.core.errors import InputError, NotFoundError
from icma.core.names import check_name, is_name
from icma.core.tasks import TASKS
from icma.generation.models import model_label

log = logging.getLogger(__name__)

MANIFEST = "icma-adapter.json"
#: The request's name for the untuned model (``"adapter": "base"``); reserved, never a folder.
BASE = "base"


class UnknownAdapterError(NotFoundError):
    """No adapter of that name in the registry (a 404)."""


def is_reserved(name: str) -> bool:
    """``base`` in any case (a folder ``Base`` is the same folder on case-insensitive disks)."""
    return name.lower() == BASE


def check_adapter_name(name: object, *, field: str) -> str:
    """A name a new adapter may take: a valid name that is not the reserved ``base``."""
    check_name(name, field=field, what="adapter name")
    if is_reserved(name):  # type: ignore[arg-type]
        raise InputError(f"{BASE!r} is reserved: it asks for the untuned model", field=field)
    return name  # type: ignore[return-value]


@dataclass
class AdapterInfo:
    name: str
    path: Path
    base_model: str | None
    r: int | None
    lora_alpha: float | None
    target_modules: list[str]
    task: str | None = None  # from the manifest, when tuning wrote one
    manifest: dict = field(default_factory=dict)
    shipped: bool = False  # from icma's package, not the registry folder

    def as_adapter(self) -> Adapter:
        return Adapter(self.name, self.path)

    @property
    def tuned_prompt(self) -> dict:
        """The prompt form it was tuned on (the manifest's ``prompt``; empty when unknown)."""
        prompt = self.manifest.get("prompt")
        return prompt if isinstance(prompt, dict) else {}

    @property
    def served_generation(self) -> dict:
        """The decoding it is served with when a request names none (the manifest's
        ``generation``, chosen on a dev slice when it was shipped: ``{"decoding": "greedy"}``
        or ``{"decoding": "consensus", "num_samples": 8}``; empty: the task's default).
        A manifest is the operator's file, not the request: one this server cannot decode
        with is ignored (and logged), never a 422 blamed on a client that did not send it."""
        gen = self.manifest.get("generation")
        if gen is None:
            return {}
        decoding = gen.get("decoding") if isinstance(gen, dict) else None
        n = gen.get("num_samples") if isinstance(gen, dict) else None
        if decoding == "consensus" and isinstance(n, int) and not isinstance(n, bool) \
                and 2 <= n <= BOUNDS["num_samples"]["le"]:
            return {"decoding": decoding, "num_samples": n}
        if decoding in DECODINGS and decoding != "consensus" and n is None:
            return {"decoding": decoding}
        log.warning("adapter %s: manifest generation %r is not a decoding this server knows; "
                    "requests that name none get the task's default", self.name, gen)
        return {}

    @property
    def prime_answer(self) -> bool | None:
        value = self.tuned_prompt.get("prime_answer")
        return value if isinstance(value, bool) else None

    @property
    def base_label(self) -> str | None:
        """The model it was tuned from, as responses name models (``model_label``)."""
        base = self.manifest.get("base_model") or self.base_model
        return model_label(base) if base else None


class AdapterRegistry:
    """The registry folder ``root`` over the shipped adapters in ``shipped`` (None: none)."""

    def __init__(self, root: Path, shipped: Path | None = None):
        self.root = Path(root)
        self.shipped = Path(shipped) if shipped else None

    @classmethod
    def from_settings(cls, settings) -> "AdapterRegistry":
        return cls(settings.adapters_path(), settings.shipped_adapters_dir)

    def _layers(self) -> list[tuple[Path, bool]]:
        return [(self.root, False)] + ([(self.shipped, True)] if self.shipped else [])

    def list(self) -> list[AdapterInfo]:
        found: dict[str, AdapterInfo] = {}
        for root, shipped in self._layers():
            if not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if folder.name in found or not _servable(folder):
                    continue
                info = read_adapter(folder, shipped=shipped)
                if info is not None:
                    found[folder.name] = info
        return [found[name] for name in sorted(found)]

    def get(self, name: str) -> AdapterInfo:
        check_name(name, field="adapter", what="adapter name")
        for root, shipped in self._layers():
            info = read_adapter(root / name, shipped=shipped) \
                if _servable(root / name) else None
            if info is not None:
                return info
        known = ", ".join(a.name for a in self.list()) or "none"
        raise UnknownAdapterError(f"no adapter named {name!r} (known: {known}; see GET "
                                  f"/v1/adapters)", field="adapter")

    def is_shipped(self, name: str) -> bool:
        return self.shipped is not None and _servable(self.shipped / name) \
            and read_adapter(self.shipped / name) is not None


def _servable(folder: Path) -> bool:
    return is_name(folder.name) and not is_reserved(folder.name) and folder.is_dir()


def read_adapter(folder: Path, *, shipped: bool = False) -> AdapterInfo | None:
    """The adapter in ``folder``, or None when it is not (or not yet completely) one."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None  # not (or not yet completely) an adapter folder
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    targets = config.get("target_modules") or []
    return AdapterInfo(
        name=folder.name, path=folder, base_model=config.get("base_model_name_or_path"),
        r=config.get("r"), lora_alpha=config.get("lora_alpha"),
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        task=manifest.get("task"), manifest=manifest, shipped=shipped)


class DefaultAdapters:
    """Which adapter a request that names none gets, per task.

    The choice: ``overrides`` (``ICMA_DEFAULT_ADAPTERS``: task -> adapter name, or ``base`` for
    none) where it names the task, else the shipped adapter for the task whose manifest says
    ``"default": true`` (the first by name, should two say so). A chosen adapter is applied only
    when it can be served as tuned: tuned for that task, from the engine's model (compared by
    name, as ``model_label`` gives it) and, under vLLM, of a rank it takes; otherwise the base
    model answers and the reason is logged once. ``model`` None (the nearest-neighbour engine,
    which has no model) applies none.
    """

    def __init__(self, registry: AdapterRegistry, model: str | None,
                 overrides: Mapping[str, str] | None = None, max_rank: int | None = None):
        self.registry, self.overrides = registry, dict(overrides or {})
        self.model = model_label(model) if model is not None else None
        self.max_rank = max_rank
        self._warned: set[tuple[str, str, str]] = set()

    @classmethod
    def from_settings(cls, settings, registry: AdapterRegistry, *, engine: str | None = None,
                      model: str | None = None) -> "DefaultAdapters":
        """The worker's (and the CLI's, whose flags may name another engine or model)."""
        engine = engine or settings.engine
        return cls(registry, None if engine == "nearest-neighbour" else
                   (model or settings.llm_model), settings.default_adapters,
                   settings.vllm_max_lora_rank if engine == "vllm" else None)

    def chosen(self, task: str) -> str | None:
        """The adapter name chosen for ``task`` (None: the base model), before any check."""
        if task in self.overrides:
            name = self.overrides[task]
            return None if is_reserved(name) else name
        marked = [a.name for a in self.registry.list()
                  if a.shipped and a.task == task and a.manifest.get("default") is True]
        return marked[0] if marked else None

    def for_task(self, task: str) -> AdapterInfo | None:
        """The adapter to apply to a request for ``task`` that names none (None: the base)."""
        name = self.chosen(task) if self.model is not None else None
        if name is None:
            return None
        try:
            info = self.registry.get(name)
        except NotFoundError:
            return self._skip(task, name, "there is no such adapter")
        if info.task not in (None, task):
            return self._skip(task, name, f"it was tuned for {info.task}")
        if info.base_label is not None and info.base_label != self.model:
            return self._skip(task, name, f"it was tuned from {info.base_label} and the engine "
                                          f"serves {self.model}")
        if self.max_rank is not None and (info.r or 0) > self.max_rank:
            return self._skip(task, name, f"its LoRA rank {info.r} is above the vllm engine's "
                                          f"largest ({self.max_rank}, ICMA_VLLM_MAX_LORA_RANK)")
        return info

    def table(self) -> dict[str, str | None]:
        """Task -> the default adapter applied now (None: the base model)."""
        out = {}
        for task in TASKS:
            info = self.for_task(task)
            out[task] = info.name if info else None
        return out

    def _skip(self, task: str, name: str, why: str) -> None:
        if (task, name, why) not in self._warned:
            self._warned.add((task, name, why))
            log.warning("default adapter %r for %s not applied (%s): requests that name no "
                        "adapter get the base model", name, task, why)
        return None


def ship_adapter(info: AdapterInfo, dest_root: Path, *, default: bool = True) -> Path:
    """Copy a tuned adapter into the shipped adapters (``dest_root``) as they are kept there:
    the LoRA weights in bfloat16 (half of float32's bytes; the engines load them into the
    model's own dtype), the manifest without this machine's paths and, with ``default``,
    marked as its task's default (any other shipped adapter of the task is unmarked)."""
    import hashlib
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if info.task is None:
        raise InputError(f"adapter {info.name!r} has no manifest task (only adapters tuned by "
                         f"icma tune ship)", field="name")
    weights = info.path / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"adapter {info.name!r} has no adapter_model.safetensors",
                         field="name")
    target = Path(dest_root) / info.name
    if target.exists():
        raise InputError(f"{target} exists already; remove it first", field="name")
    tmp = target.parent / f".{info.name}.saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((info.path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = info.base_label  # a name, never a path
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    manifest = {k: v for k, v in info.manifest.items() if k != "base_model_path"}
    manifest["base_model"] = info.base_label
    if isinstance(manifest.get("evaluation"), dict):
        manifest["evaluation"] = {k: v for k, v in manifest["evaluation"].items()
                                  if k != "predictions"}
    digest = hashlib.sha256((tmp / "adapter_model.safetensors").read_bytes()).hexdigest()
    manifest.update(default=default, shipped_weights={"dtype": "bfloat16", "sha256": digest})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if default:
        for other in AdapterRegistry(dest_root).list():
            if other.task == info.task and other.manifest.get("default") is True:
                (other.path / MANIFEST).write_text(
                    json.dumps({**other.manifest, "default": False}, indent=1) + "\n")
    tmp.rename(target)
    return target
