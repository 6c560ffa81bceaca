"""The adapter registry: a directory with one peft LoRA folder per adapter, served by name.

The directory is read on every lookup (a listing of a few folders), so an adapter saved into it
by ``icma tune`` or copied in by hand is served at once, without restarting the worker. An
optional ``icma-adapter.json`` manifest in the folder (written by tuning) says what the adapter
was trained for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from icma.generation.engines import Adapter
from icma.core.errors import NotFoundError
from icma.core.names import check_name, is_name

MANIFEST = "icma-adapter.json"


class UnknownAdapterError(NotFoundError):
    """No adapter of that name in the registry (a 404)."""


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

    def as_adapter(self) -> Adapter:
        return Adapter(self.name, self.path)

    @property
    def tuned_prompt(self) -> dict:
        """The prompt form it was tuned on (the manifest's ``prompt``; empty when unknown)."""
        prompt = self.manifest.get("prompt")
        return prompt if isinstance(prompt, dict) else {}

    @property
    def prime_answer(self) -> bool | None:
        value = self.tuned_prompt.get("prime_answer")
        return value if isinstance(value, bool) else None


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def list(self) -> list[AdapterInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and is_name(folder.name):
                info = read_adapter(folder)
                if info is not None:
                    out.append(info)
        return out

    def get(self, name: str) -> AdapterInfo:
        check_name(name, field="adapter", what="adapter name")
        info = read_adapter(self.root / name) if (self.root / name).is_dir() else None
        if info is None:
            known = ", ".join(a.name for a in self.list()) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} (known: {known}; see GET "
                                      f"/v1/adapters)", field="adapter")
        return info


def read_adapter(folder: Path) -> AdapterInfo | None:
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
        task=manifest.get("task"), manifest=manifest)
