"""The settings of one ICMT run: one validated object, from a config file, flags or a job.

Defaults are ICMA's (``icma-method.md`` section 4): LoRA r 32 / alpha 64 / dropout 0.1 on every
Linear layer but the output head, AdamW at 2e-4 with a linear schedule after warm-up, effective
batch 32 (8 x 4 accumulation), 10 epochs, loss on the answer only. Where ICMA leaves a choice
open, the field says which way it goes here.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icma.core.errors import InputError
from icma.generation.adapters import check_adapter_name
from icma.generation.engines import BOUNDS
from icma.generation.models import DEFAULT_LLM
from icma.core.prompts import DEFAULT_EOS
from icma.core.rerank import RandomWalk
from icma.core.tasks import ALL_METHODS, TASKS, check_method, per_task, spec

Method = Literal[ALL_METHODS]
#: ICMA's warm-up: 1000 of its about 8000 steps. Shorter runs keep the proportion (an eighth).
ICMA_WARMUP = 1000
WARMUP_SHARE = 8


class TuneOptions(BaseModel):
    """Everything about an ICMT run but its task (the worker's tune jobs take the task beside
    these, as translation jobs do). Unknown fields are errors: a typo must not silently train
    with a default."""

    model_config = ConfigDict(extra="forbid")

    # what to learn
    name: str = Field(description="the adapter's name in the registry (and the run folder's)")
    base_model: str = Field(default=DEFAULT_LLM,
                            description="the shipped default, or (icma tune) a local "
                                        "transformers folder, or (a tune job) the name of a "
                                        "folder in ICMA_MODELS_DIR; a hub id with "
                                        "ICMA_ALLOW_MODEL_DOWNLOADS=true")
    train: str = Field(default="embedded",
                       description="training corpus: 'embedded' (ChEBI-20 val + test), a corpus "
                                   "the retrieval service holds (by name), a TSV/JSONL file "
                                   "(icma tune), or '@upload' (a file uploaded with the tune "
                                   "job)")
    train_limit: int | None = Field(default=None, ge=1,
                                    description="use only the first N training records")
    contexts: str | None = Field(default=None,
                                 description="corpus the in-context examples come from; default: "
                                             "the training corpus (each record's own CID "
                                             "excluded)")
    # prompts
    retrieval: Method | None = Field(default=None,
                                     description="default: " + per_task("default_method"))
    n_shot: int | None = Field(default=None, ge=0, le=16,
                               description="examples per prompt; default " + per_task("n_shot"))
    cutoff: int = Field(default=2048, ge=16, le=32768,
                        description="tokens of prompt + answer; lowest-ranked examples are "
                                    "dropped to fit, examples that cannot fit at all are skipped")
    order: Literal["reversed", "ranked"] = Field(
        default="reversed", description="reversed: the best example last (ICMA)")
    random_walk: RandomWalk | None = None
    exclude_same_structure: bool = False
    exclude_same_caption: bool = False
    prime_answer: bool = Field(
        default=True, description="prompts end with the answer marker, as the worker serves "
                                  "untuned models; off: ICMA's own training text, the model "
                                  "learns to write the marker")
    eos: str = Field(default=DEFAULT_EOS, min_length=1,
                     description="text ending every answer, or 'model' for the tokenizer's own "
                                 "EOS token")
    train_on_inputs: bool = Field(default=False,
                                  description="loss on the whole text, not only the answer")
    # model
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(default=32, ge=1, le=1024)
    lora_alpha: float = Field(default=64, gt=0)
    lora_dropout: float = Field(default=0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        default=None, min_length=1,
        description="default: every Linear layer but the output head")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none", description="load the base model in 8 or 4 bits (LoRA on a GPU only)")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on the CPU, bfloat16 on a GPU")
    device: str = Field(default="auto", description="auto | cpu | cuda[:n]")
    # optimisation
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    warmup_steps: int | None = Field(
        default=None, ge=0,
        description=f"default: ICMA's {ICMA_WARMUP}, or an eighth of the run when it is "
                    f"shorter than {WARMUP_SHARE * ICMA_WARMUP} steps (ICMA's proportion)")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="None: no clipping")
    epochs: float = Field(default=10, gt=0, le=1000)
    max_steps: int | None = Field(default=None, ge=1, description="overrides epochs")
    batch_size: int = Field(default=8, ge=1, le=1024, description="examples per forward pass")
    grad_accum: int = Field(default=4, ge=1, le=1024,
                            description="forward passes per optimiser step")
    group_by_length: bool = Field(
        default=True, description="micro-batches of examples of similar length (sorted within "
                                  "windows of 16 micro-batches of the shuffled data, then "
                                  "shuffled): less padding; off: plain shuffled batches")
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    # bookkeeping
    save_steps: int = Field(default=100, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_steps: int = Field(default=1, ge=1, description="progress report every N steps")
    # evaluation after training, through the serving path
    eval: str | None = Field(default=None, description="evaluation corpus (as train); none: "
                                                       "no evaluation")
    eval_limit: int | None = Field(default=None, ge=1)
    eval_decoding: Literal["sample", "greedy", "consensus"] = Field(
        default="sample", description="sample: ICMA's inference settings; consensus: "
                                      "eval_num_samples samples pooled with the examples' "
                                      "answers (as a request's generation.decoding)")
    eval_num_samples: int | None = Field(
        default=None, ge=2, le=BOUNDS["num_samples"]["le"],
        description="consensus evaluation: answers sampled per record (default: a request's)")
    eval_max_new_tokens: int = Field(default=256, ge=1, le=4096)


class TuneConfig(TuneOptions):
    """A whole run: the task and its options."""

    task: Literal[TASKS]

    @model_validator(mode="after")
    def _consistent(self) -> "TuneConfig":
        # InputError is not a ValueError: pydantic lets it through, field and all.
        check_adapter_name(self.name, field="name")  # "base" asks for the untuned model
        check_method(self.task, self.retrieval, field="retrieval")
        if self.eval_num_samples is not None and self.eval_decoding != "consensus":
            raise InputError("eval_num_samples is for eval_decoding 'consensus'",
                             field="eval_num_samples")  # found now, not after hours of training
        if self.method == "full" and self.quantization != "none":
            raise InputError("8/4-bit loading is for LoRA (a quantised model cannot be fully "
                             "fine-tuned)", field="quantization")
        return self

    # resolved defaults
    @property
    def method_for_contexts(self) -> str:
        return check_method(self.task, self.retrieval, field="retrieval")

    @property
    def shots(self) -> int:
        return spec(self.task).n_shot if self.n_shot is None else self.n_shot

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(ICMA_WARMUP, total_steps // WARMUP_SHARE)

    def fingerprint(self) -> dict:
        """What a checkpoint must agree with to be resumed (bookkeeping may change)."""
        skip = {"save_steps", "keep_checkpoints", "log_steps", "eval", "eval_limit",
                "eval_decoding", "eval_num_samples", "eval_max_new_tokens", "device"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


def parse_config(data: dict) -> TuneConfig:
    """A TuneConfig from plain data; every problem becomes an InputError naming its field."""
    if not isinstance(data, dict):
        raise InputError("a tuning config is a mapping of settings", field="config")
    try:
        return TuneConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(_first_error(exc), field=_first_field(exc)) from None


def read_config_file(path: str | Path) -> dict:
    """Settings from a .json, .toml or .yaml file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no config file {path}", field="config")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InputError(f"{path}: use a .json, .toml or .yaml file", field="config")
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path} does not parse: {exc}", field="config") from None
    except Exception as exc:  # yaml's errors share no base class with the others
        if type(exc).__module__.startswith("yaml"):
            raise InputError(f"{path} does not parse: {exc}", field="config") from None
        raise
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of settings", field="config")
    return data


def _first_field(exc: ValidationError) -> str:
    return ".".join(str(p) for p in exc.errors()[0]["loc"]) or "config"


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown setting (see `icma tune --help`)"
    return str(err["msg"]).removeprefix("Value error, ")


def _first_error(exc: ValidationError) -> str:
    """The first problem (its field is the error's field), then up to two more."""
    errors = exc.errors()
    first = _message(errors[0])
    more = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {_message(e)}"
            for e in errors[1:3]]
    return "; also ".join([first, *more])
