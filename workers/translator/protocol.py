"""Request and response schemas of the translation worker (one module, as vLLM's protocol)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from icma.core.chem import MAX_SMILES_CHARS
from icma.core.depict import DEFAULT_SIZE, SIZE_BOUNDS
from icma.core.molregpt import N_SHOT
from icma.core.prompts import MAX_QUERY_CHARS
from icma.core.rerank import RandomWalk
from icma.core.tasks import ALL_METHODS, TASK_SPECS, TASKS, per_task
from icma.generation.engines import BOUNDS, DECODINGS, MIN_SAMPLING_TEMPERATURE, \
    GenerationParams
from icma.generation.options import DEFAULT_CUTOFF, DEFAULT_NUM_SAMPLES
from icma.tuning.config import TuneOptions

Method = Literal[ALL_METHODS]
TaskName = Literal[TASKS]
_DEFAULT = GenerationParams()


class Strict(BaseModel):
    """Unknown fields are errors, and values are not coerced: "2" or true for an integer, "yes"
    for a flag, 1e30 for top_k are client bugs to report (JSON integers still fill float
    fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Retrieval(Strict):
    """Passed on to the retrieval service (its names; ``k`` is ``n_shot``)."""

    method: Method | None = Field(
        default=None, description="; ".join(f"{t}: {' | '.join(s.methods)}"
                                            for t, s in TASK_SPECS.items())
        + "; default " + per_task("default_method"))
    corpus: str | None = Field(default=None, max_length=64,
                               description="the retrieval service's corpus; default its own")
    exclude_cids: list[str] = Field(default_factory=list, max_length=1000,
                                    description="never use these CIDs as examples")
    exclude_same_structure: bool = Field(
        default=False, description="mol2cap: drop examples with the query's structure")
    exclude_same_caption: bool = Field(
        default=False, description="cap2mol: drop examples whose caption equals the query")
    random_walk: RandomWalk | None = Field(
        default=None, description="re-rank by a seeded random walk down the top candidates")


class Generation(Strict):
    """Decoding. Defaults are ICMA's inference settings (sampling at temperature 0.7, top_p
    0.85, top_k 40, 256 new tokens, seed 42; repetition penalty 0.8 for cap2mol, 1.0 for
    mol2cap)."""

    decoding: Literal[DECODINGS] | None = Field(
        default=None,
        description="sample (ICMA's), greedy, beam, or consensus: sample num_samples answers, "
                    "pool them with the examples' answers and return the one most similar to "
                    "the rest (captions: n-gram F1; molecules: Morgan Tanimoto, valid ones only)"
                    f"; default: the adapter's (GET /v1/adapters: generation), else "
                    f"{_DEFAULT.decoding}")
    temperature: float = Field(default=_DEFAULT.temperature, **BOUNDS["temperature"],
                               description=f"below {MIN_SAMPLING_TEMPERATURE}, sampling "
                                           "decodes greedily (it is greedy in effect, and "
                                           "colder sampling overflows)")
    top_p: float = Field(default=_DEFAULT.top_p, **BOUNDS["top_p"])
    top_k: int = Field(default=_DEFAULT.top_k, **BOUNDS["top_k"], description="0: no top-k cut")
    num_beams: int = Field(default=_DEFAULT.num_beams, **BOUNDS["num_beams"],
                           description="beam search only")
    max_new_tokens: int = Field(default=_DEFAULT.max_new_tokens, **BOUNDS["max_new_tokens"])
    repetition_penalty: float | None = Field(
        default=None, **BOUNDS["repetition_penalty"],
        description="default: " + per_task("repetition_penalty"))
    no_repeat_ngram_size: int = Field(
        default=_DEFAULT.no_repeat_ngram_size, **BOUNDS["no_repeat_ngram_size"],
        description="no n-gram of this many tokens twice in the answer (the prompt's do not "
                    "count); 0: off; not with vLLM's beam search")
    num_samples: int | None = Field(
        default=None, ge=2, le=BOUNDS["num_samples"]["le"],
        description=f"consensus only: answers sampled per input (seeds seed, seed+1, ... with "
                    f"vLLM; one seeded call with transformers); default {DEFAULT_NUM_SAMPLES}, "
                    f"at most ICMA_MAX_SAMPLES")
    seed: int = Field(default=_DEFAULT.seed, **BOUNDS["seed"])


class _Translate(Strict):
    retrieval: Retrieval = Field(default_factory=Retrieval)
    generation: Generation = Field(default_factory=Generation)
    adapter: str | None = Field(default=None, max_length=64,
                                description="a LoRA adapter from GET /v1/adapters, or 'base' "
                                            "for the untuned model; default: the task's "
                                            "default adapter (GET /v1/adapters: defaults), "
                                            "else the base model")
    prime_answer: bool | None = Field(
        default=None, description="end the prompt with the answer marker ('Caption:' / "
                                  "'Molecule:'); default: on for the base model, off with an "
                                  "adapter (ICMA-tuned models write it themselves)")
    cutoff: int = Field(default=DEFAULT_CUTOFF, ge=64, le=32768,
                        description="token budget of prompt + answer; the lowest-ranked "
                                    "examples are dropped to fit")
    prompt_style: Literal["icma", "molregpt"] = Field(
        default="icma",
        description="icma: ICMA's prompts; molregpt: MolReGPT's chat messages and JSON "
                    "answers (defaults: 10 examples best first, retrieval rdkit / bm25, the "
                    "base model unless an adapter is named; a server that refuses the prompt "
                    "as too long gets it again without its longest example)")
    return_prompt: bool = Field(default=False, description="include the prompt the engine got")


class Mol2CapRequest(_Translate):
    smiles: str = Field(min_length=1, max_length=MAX_SMILES_CHARS,
                        examples=["CC(=O)Oc1ccccc1C(=O)O"])
    n_shot: int | None = Field(
        default=None, ge=0, description=f"examples in the prompt; default: the adapter's tuned "
                                        f"number, else ICMA's {TASK_SPECS['mol2cap'].n_shot} "
                                        f"(MolReGPT's {N_SHOT})")


class Cap2MolRequest(_Translate):
    caption: str = Field(min_length=1, max_length=MAX_QUERY_CHARS,
                         examples=["The molecule is a member of the class of benzoic acids "
                                   "that is salicylic acid in which the hydroxy group has "
                                   "been acetylated."])
    n_shot: int | None = Field(
        default=None, ge=0, description=f"examples in the prompt; default: the adapter's tuned "
                                        f"number, else ICMA's {TASK_SPECS['cap2mol'].n_shot} "
                                        f"(MolReGPT's {N_SHOT})")
    num_candidates: int = Field(
        default=1, ge=1, description="sample up to this many molecules (seeds seed, seed+1, "
                                     "...) and return the first that RDKit parses")


class ExampleUsed(BaseModel):
    cid: str
    smiles: str
    description: str
    score: float
    rank: int = Field(description="1 = the most similar (the prompt writes it last)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    draft_tokens: int = Field(0, description="tokens prompt-lookup speculation proposed (greedy "
                                             "decoding; 0 when it did not run)")
    accepted_tokens: int = Field(0, description="of those, the ones greedy decoding confirmed and "
                                                "the answer kept")
    acceptance_rate: float | None = Field(None, description="accepted / draft tokens (null: "
                                                            "nothing drafted)")


class TranslationTimings(BaseModel):
    retrieval_ms: float = Field(description="the call to the retrieval service")
    prompt_ms: float = Field(description="prompt assembly within the token budget")
    generation_ms: float = Field(description="the engine, including waiting for it")
    total_ms: float


class Consensus(BaseModel):
    """Which candidate consensus decoding returned, and from where."""

    samples: int = Field(description="answers sampled")
    pool: int = Field(description="candidates that competed: the non-empty samples and the "
                                  "examples' answers (cap2mol: only those RDKit parses)")
    source: Literal["sample", "example"] = Field(description="where the answer came from")
    sample: int | None = Field(description="the winning sample (0-based, in seed order)")
    cid: str | None = Field(description="the example whose answer won")
    rank: int | None = Field(description="that example's rank (1 = best)")
    score: float | None = Field(description="the winner's mean similarity to the rest of the "
                                            "pool (null for a pool of one or none)")


class _Translated(BaseModel):
    examples: list[ExampleUsed] = Field(description="examples in the prompt, best first")
    n_examples_dropped: int = Field(description="examples dropped to fit the token budget")
    engine: str
    model: str
    adapter: str | None
    prime_answer: bool
    prompt_style: Literal["icma", "molregpt"] = "icma"
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: TranslationTimings
    prompt: str | None = Field(default=None, description="when return_prompt was set")
    consensus: Consensus | None = Field(default=None,
                                        description="decoding consensus: the chosen candidate")


class Mol2CapResponse(_Translated):
    caption: str


class Cap2MolResponse(_Translated):
    smiles: str = Field(description="as generated")
    canonical_smiles: str | None = Field(description="RDKit's canonical form, when valid")
    valid: bool
    candidates_tried: int


# --- jobs ------------------------------------------------------------------------------------

class JobItem(Strict):
    input: str = Field(description="a SMILES (mol2cap) or a caption (cap2mol)")
    id: str | None = Field(default=None, max_length=256)
    reference: str | None = Field(default=None,
                                  description="the true answer, kept for `icma eval`")


class JobOptions(_Translate):
    n_shot: int | None = Field(default=None, ge=0, description="default: " + per_task("n_shot"))
    num_candidates: int = Field(default=1, ge=1, description="cap2mol only")
    return_prompt: bool = Field(default=False, description="ignored for jobs")


class JobCreate(Strict):
    """A batch translation job."""

    kind: Literal["translate"] = "translate"
    task: TaskName
    items: list[JobItem | str] = Field(min_length=1, description="inputs, or objects with "
                                                                "an input, id and reference")
    options: JobOptions = Field(default_factory=JobOptions)


class TuneJobOptions(TuneOptions):
    """``TuneOptions`` without coercion, as every request schema (config files and flags for
    ``icma tune`` keep their own parsing)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TuneJobCreate(Strict):
    """An in-context molecule tuning job: the adapter is registered under ``options.name``
    when it succeeds."""

    kind: Literal["tune"]
    task: TaskName
    options: TuneJobOptions


def _job_kind(body) -> str:
    kind = body.get("kind", "translate") if isinstance(body, dict) else getattr(body, "kind",
                                                                                "translate")
    # Tags are the class names: error locations then read like other unions' (icma.server.http drops
    # type names from the field it reports).
    return "TuneJobCreate" if kind == "tune" else "JobCreate"


#: ``kind`` picks the schema; without it a body is a translation job (as before tune jobs).
AnyJobCreate = Annotated[Union[Annotated[JobCreate, Tag("JobCreate")],
                               Annotated[TuneJobCreate, Tag("TuneJobCreate")]],
                         Discriminator(_job_kind)]


class Job(BaseModel):
    id: str
    kind: Literal["translate", "tune"]
    task: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    total: int
    done: int
    failed: int = Field(description="items done with an error")
    progress: float = Field(description="done / total")
    created: float
    started: float | None
    finished: float | None
    message: str | None = Field(description="why it failed, or what it is waiting for")
    options: dict
    results_url: str | None = Field(description="translation jobs: their result lines")
    tuning: dict | None = Field(
        default=None, description="tune jobs: phase, step, total_steps, epoch, loss, "
                                  "learning_rate, tokens_per_s, eta_s; when done the adapter "
                                  "and its evaluation metrics")


class JobList(BaseModel):
    jobs: list[Job]


class AdapterOut(BaseModel):
    name: str
    base_model: str | None = Field(description="the model it was tuned from: the shipped "
                                               "default, a hub id, or a model folder's name")
    r: int | None
    lora_alpha: float | None
    target_modules: list[str]
    task: str | None = Field(description="from the adapter's manifest, when tuning wrote one")
    prime_answer: bool | None = Field(
        default=None, description="the prompt form it was tuned on (the default for requests "
                                  "that use it), from the manifest")
    generation: dict | None = Field(
        default=None, description="the decoding it is served with when a request names none "
                                  "(chosen on a dev slice when it was shipped), from the "
                                  "manifest; null: the task's default")
    evaluation: dict | None = Field(default=None,
                                    description="metrics measured after tuning, from the "
                                                "manifest")
    shipped: bool = Field(default=False, description="shipped with icma (read-only), not a "
                                                     "folder of the registry")
    default_for: str | None = Field(default=None,
                                    description="the task whose requests get it when they "
                                                "name no adapter")


class Adapters(BaseModel):
    adapters: list[AdapterOut]
    defaults: dict[str, str | None] = Field(
        default_factory=dict, description="task -> the adapter a request that names none "
                                          "gets (null: the base model)")


class JobMetrics(BaseModel):
    job_id: str
    task: str
    scored: int = Field(description="result lines with a reference (each scored; an error counts "
                                    "as an empty answer, as `icma eval` scores it)")
    total: int = Field(description="the job's inputs")
    metrics: dict[str, float | int | None] = Field(
        description="MolT5's metrics (`icma eval`'s numbers; FCD is left to `icma eval`)")


class DepictRequest(Strict):
    smiles: str = Field(min_length=1, max_length=MAX_SMILES_CHARS, description="the molecule")
    reference: str | None = Field(
        default=None, max_length=MAX_SMILES_CHARS,
        description="highlight the atoms the molecule shares with this one (their maximum "
                    "common substructure, searched within ICMA_DEPICT_MCS_TIMEOUT_S)")
    width: int = Field(default=DEFAULT_SIZE[0], ge=SIZE_BOUNDS[0], le=SIZE_BOUNDS[1])
    height: int = Field(default=DEFAULT_SIZE[1], ge=SIZE_BOUNDS[0], le=SIZE_BOUNDS[1])
