"""Training contexts: retrieved from the training corpus itself, never holding the answer."""

from icma.core.corpus import read_corpus
from icma.retrieval.examples import retrieve_examples, training_contexts
from icma.core.prompts import build_prompt, training_text
from icma.core.rerank import RerankConfig
from icma.retrieval import ExclusionRule, build_index


def test_no_context_holds_its_own_cid_bm25_whole_iupac_train(shared):
    # This split repeats 2 CIDs: excluding by position, as ICMA did, leaks the twin record.
    train, report = read_corpus(shared / "data/pubchem324k-iupac/train.txt", on_invalid="keep")
    assert report.duplicate_cids
    index = build_index("bm25", train)
    contexts = training_contexts(index, 4)
    assert len(contexts) == len(train)
    for record, examples in zip(train.records, contexts):
        assert len(examples) == 4
        assert record.cid not in {e.cid for e in examples}
    twins = {c for _, c, _ in report.duplicate_cids}
    for i, r in enumerate(train.records):
        if r.cid in twins:
            hits = index.search([r.description], 2)[0]
            assert r.cid in {h.cid for h in hits}  # without the rule the twin comes back


def test_no_context_holds_its_own_cid_or_structure_morgan_whole_chebi_val(chebi_val):
    index = build_index("morgan", chebi_val)
    rule = ExclusionRule(self_cid=True, same_structure=True, same_caption=True)
    contexts = training_contexts(index, 2, rule=rule,
                                 rerank=RerankConfig(method="random_walk", skip_prob=0.2, seed=7))
    for record, examples in zip(chebi_val.records, contexts):
        assert len(examples) == 2
        for e in examples:
            assert e.cid != record.cid
            assert chebi_val.canonical[chebi_val.position(e.cid)] != record.canonical
            assert e.caption != record.description


def test_training_text_equals_serving_prompt_plus_answer(chebi_val):
    small = chebi_val.subset(range(300))
    index = build_index("morgan", small)
    ctx = training_contexts(index, 2)
    rec = small.records[10]
    served = retrieve_examples(index, [rec.smiles], 2,
                               exclusions=[ExclusionRule().for_record(rec)])[0]
    assert served == ctx[10]
    prompt = build_prompt("mol2cap", rec.smiles, served)
    text = training_text("mol2cap", rec.smiles, rec.description, ctx[10])
    assert text == prompt.raw + "Caption: " + rec.description + "</s>"
    assert text.strip().startswith(prompt.text)
