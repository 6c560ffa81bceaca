"""RetrievalService without HTTP: protocol objects in, protocol objects or icma errors out."""

from __future__ import annotations

import asyncio

import pytest

from icma.core.chem import canonical_smiles
from icma.core.corpus import embedded_corpus, write_corpus
from icma.core.errors import ConflictError, ForbiddenError, IcmaError, InputError, NotFoundError
from icma.retrieval import Exclusion
from icma.retrieval.cache import cached_index
from icma.retrieval.examples import retrieve_examples
from icma.services.retrieval.protocol import CaptionRequest, MoleculeRequest
from icma.services.retrieval.serving import (
    INLINE_CAPTION_QUERIES,
    INLINE_MOLECULE_QUERIES,
    RetrievalService,
)
from tests.conftest import SERVICE_KINDS
from tests.test_retrieval_service import ASPIRIN, settings


@pytest.fixture(scope="module")
def service(svc_dir):
    svc = RetrievalService(settings(svc_dir))
    svc.start(background=False)
    return svc


def raised(call, status: int, field: str) -> IcmaError:
    """The icma error that ``call()`` (a coroutine's result is awaited) raises, checked."""
    def run():
        out = call()
        return asyncio.run(out) if asyncio.iscoroutine(out) else out

    with pytest.raises(IcmaError) as info:
        run()
    assert (info.value.status, info.value.field) == (status, field), info.value
    return info.value


def test_molecules_equal_the_library_on_the_loop_and_in_the_thread_pool(service, svc_dir):
    corpus = embedded_corpus()
    res = asyncio.run(service.retrieve_molecules(
        MoleculeRequest(smiles=ASPIRIN, k=3, order="ranked")))
    lib = retrieve_examples(cached_index("graph", corpus, svc_dir, settings=service.settings),
                            [ASPIRIN], 3)[0]
    assert (res.corpus, res.method, res.k) == ("chebi20-embedded", "graph", 3)
    assert [(e.cid, e.score) for e in res.results[0].examples] == [(e.cid, e.score) for e in lib]
    assert [e.rank for e in res.results[0].examples] == [1, 2, 3]
    assert res.timings.total_ms >= res.timings.retrieval_ms > 0

    # More queries than the loop takes go to the thread pool's batcher: the same answers.
    smiles = corpus.smiles[:INLINE_MOLECULE_QUERIES + 1]
    big = asyncio.run(service.retrieve_molecules(
        MoleculeRequest(smiles=smiles, k=2, method="morgan", exclude_same_structure=True)))
    for s, out in zip(smiles, big.results):
        alone = asyncio.run(service.retrieve_molecules(
            MoleculeRequest(smiles=s, k=2, method="morgan", exclude_same_structure=True)))
        assert out == alone.results[0]
        assert out.canonical_smiles not in {canonical_smiles(e.smiles) for e in out.examples}


def test_captions_in_prompt_order_with_exclusions_and_metrics(service, svc_dir):
    corpus = embedded_corpus()
    queries = [corpus.descriptions[42], "The molecule is an amino acid."]
    res = asyncio.run(service.retrieve_captions(
        CaptionRequest(caption=queries, exclude_cids=[corpus.cids[42]])))
    lib = retrieve_examples(cached_index("bm25", corpus, svc_dir), queries, 4,
                            exclusions=[Exclusion(cids=frozenset([corpus.cids[42]]))] * 2)
    for out, want in zip(res.results, lib):
        # default order is ICMA's: best example last
        assert [(e.cid, e.score) for e in out.examples] == [(e.cid, e.score)
                                                            for e in reversed(want)]
        assert [e.rank for e in out.examples] == [4, 3, 2, 1]
    count = service.metrics.registry.get_sample_value(
        "icma_retrieval_queries_total", {"endpoint": "captions", "method": "bm25"})
    big = asyncio.run(service.retrieve_captions(CaptionRequest(
        caption=queries * INLINE_CAPTION_QUERIES, exclude_cids=[corpus.cids[42]])))
    assert big.results[:2] == res.results
    assert service.metrics.registry.get_sample_value(
        "icma_retrieval_queries_total", {"endpoint": "captions", "method": "bm25"}) == \
        count + 2 * INLINE_CAPTION_QUERIES


def test_bad_input_raises_icma_errors_with_status_and_field(service):
    err = raised(lambda: service.retrieve_molecules(MoleculeRequest(smiles="CCO", corpus="chembl")),
                 404, "corpus")
    assert isinstance(err, NotFoundError) and "chembl" in err.message
    err = raised(lambda: service.retrieve_captions(CaptionRequest(caption="a", k=51)), 422, "k")
    assert isinstance(err, InputError) and "at most 50" in err.message
    raised(lambda: service.retrieve_molecules(MoleculeRequest(smiles=["CCO", "C1CC"])),
           422, "smiles[1]")
    raised(lambda: service.retrieve_captions(CaptionRequest(caption=["a", " "])), 422,
           "caption[1]")
    # sentence captions go to the thread pool; its errors come back all the same
    raised(lambda: service.retrieve_captions(CaptionRequest(caption="a", method="sentence")),
           422, "method")


def test_corpus_listing_and_state(service, svc_dir):
    listing = service.list_corpora()
    assert listing.default == "chebi20-embedded"
    emb = next(c for c in listing.corpora if c.name == listing.default)
    assert (emb.origin, emb.size, emb.state) == ("embedded", 6601, "ready")
    assert [i.kind for i in emb.indexes] == SERVICE_KINDS
    assert service.state() == "ready"
    assert RetrievalService(settings(svc_dir)).state() == "loading"  # never started


def test_upload(tmp_path, chebi_val, service):
    err = raised(lambda: service.upload_corpus("mine", "c.tsv", b"CID\tSMILES\n1\tCCO\n"),
                 403, "authorization")
    assert isinstance(err, ForbiddenError) and "ICMA_API_KEY" in err.message
    # A store of its own, never started: uploads build synchronously and the session's data
    # directory stays as the other tests expect it.
    svc = RetrievalService(settings(tmp_path, api_key="k"))
    path = tmp_path / "val30.tsv"
    write_corpus(chebi_val.subset(range(30)), path)
    raised(lambda: svc.upload_corpus("val30", "val30.tsv", b"\xff\xfe"), 422, "file")
    info = svc.upload_corpus("val30", "val30.tsv", path.read_bytes())
    assert (info.name, info.origin, info.size, info.state) == ("val30", "upload", 30, "ready")
    assert svc.list_corpora().corpora == [info]
    err = raised(lambda: svc.upload_corpus("val30", "val30.tsv", path.read_bytes()), 409, "name")
    assert isinstance(err, ConflictError)
    res = asyncio.run(svc.retrieve_molecules(
        MoleculeRequest(smiles=chebi_val.smiles[5], corpus="val30", k=1)))
    assert res.results[0].examples[0].cid == chebi_val.cids[5]
