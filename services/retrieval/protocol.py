"""Request and response schemas of the retrieval service (one module, as vLLM's protocol)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from icma.core.rerank import Order, RandomWalk
from icma.core.tasks import TASK_SPECS

Smiles = str
MOL2CAP, CAP2MOL = TASK_SPECS["mol2cap"], TASK_SPECS["cap2mol"]


class _RetrieveCommon(BaseModel):
    # Strict: "2" or true for k, "yes" for a flag are client bugs to report, not to coerce
    # (JSON integers still fill float fields).
    model_config = ConfigDict(extra="forbid", strict=True)
    corpus: str | None = Field(default=None, max_length=64,
                               description="corpus name; default: the embedded ChEBI-20")
    exclude_cids: list[str] = Field(default_factory=list, max_length=1000,
                                    description="never return these CIDs")
    order: Order = Field(default="reversed",
                         description="reversed: prompt order, best example last (ICMA); "
                                     "ranked: best first")
    random_walk: RandomWalk | None = None


class MoleculeRequest(_RetrieveCommon):
    smiles: Smiles | list[Smiles] = Field(
        description="one SMILES or a batch", examples=["CC(=O)Oc1ccccc1C(=O)O"])
    k: int = Field(default=MOL2CAP.n_shot, ge=1, description="examples per query")
    method: Literal[MOL2CAP.methods] = MOL2CAP.default_method
    exclude_same_structure: bool = Field(
        default=False, description="also drop examples with the query's canonical structure")


class CaptionRequest(_RetrieveCommon):
    caption: str | list[str] = Field(
        description="one caption or a batch",
        examples=["The molecule is a monocarboxylic acid that is acetic acid substituted by a "
                  "phenyl group."])
    k: int = Field(default=CAP2MOL.n_shot, ge=1, description="examples per query")
    method: Literal[CAP2MOL.methods] = CAP2MOL.default_method
    exclude_same_caption: bool = Field(
        default=False, description="also drop examples whose caption equals the query")


class ExampleOut(BaseModel):
    cid: str
    smiles: str
    description: str
    score: float
    rank: int = Field(description="1 = the most similar example")


class MoleculeResult(BaseModel):
    query: str
    canonical_smiles: str
    examples: list[ExampleOut]


class CaptionResult(BaseModel):
    query: str
    examples: list[ExampleOut]


class Timings(BaseModel):
    retrieval_ms: float
    total_ms: float


class MoleculeResponse(BaseModel):
    corpus: str
    method: str
    k: int
    order: Order
    results: list[MoleculeResult]
    timings: Timings


class CaptionResponse(BaseModel):
    corpus: str
    method: str
    k: int
    order: Order
    results: list[CaptionResult]
    timings: Timings


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: str


class Progress(BaseModel):
    indexes_done: int
    indexes_total: int
    building: str | None


class CorpusInfo(BaseModel):
    name: str
    origin: Literal["embedded", "upload"]
    size: int
    has_captions: bool
    sha256: str
    state: Literal["queued", "building", "ready", "failed"]
    progress: Progress
    indexes: list[IndexInfo]
    error: str | None = None
    build_seconds: float | None = None


class CorporaResponse(BaseModel):
    default: str
    corpora: list[CorpusInfo]

