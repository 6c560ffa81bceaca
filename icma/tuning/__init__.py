"""In-context molecule tuning (ICMT, ICMA's third stage): LoRA or full fine-tuning on prompts
built from leak-free retrieved contexts, exactly as serving builds them.

``tune(TuneConfig(...), settings=...)`` runs it; ``icma tune`` and the worker's tune jobs call it.
"""


# Imported on first use (PEP 562), so that ``icma.tuning.loop`` and ``icma.tuning.model`` load
# with torch, transformers and peft alone: the device runner of benchmarks/icmt_device.py trains
# with this loop on a machine that has no RDKit, FAISS or pydantic.
_EXPORTS = {"TuneConfig": "config", "parse_config": "config", "read_config_file": "config",
            "Stopped": "loop", "tune": "run"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'icma.tuning' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"icma.tuning.{_EXPORTS[name]}"), name)
