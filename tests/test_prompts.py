"""ICMA prompt strings, pinned byte for byte against text written out by hand from the method."""

import pytest

from icma.core.errors import InputError, PromptTooLongError
from icma.core.prompts import (
    Example,
    build_prompt,
    extract_answer,
    hf_token_counter,
    render,
    training_text,
)

BEST = Example(smiles="CCO", caption="The molecule is ethanol.", cid="702", score=0.9)
SECOND = Example(smiles="CC(=O)O", caption="The molecule is acetic acid.", cid="176", score=0.5)

MOL2CAP_TWO_SHOT = (
    "Generate a caption for the molecule: CC(=O)O\n"
    "Caption: The molecule is acetic acid.\n"
    "\n"
    "Generate a caption for the molecule: CCO\n"
    "Caption: The molecule is ethanol.\n"
    "\n"
    "Based on the above examples, analyse the similarities and differences between the examples "
    "and finally generate a caption for the molecule: CCCO. \n"
)

CAP2MOL_TWO_SHOT = (
    "Generate a molecule for the caption: The molecule is acetic acid.\n"
    "Molecule: CC(=O)O\n"
    "\n"
    "Generate a molecule for the caption: The molecule is ethanol.\n"
    "Molecule: CCO\n"
    "\n"
    "Based on the above examples, analyse the similarities and differences between the examples "
    "and finally generate a molecule for the caption: The molecule is propanol.\n"
)


def test_mol2cap_reversed_byte_exact():
    assert render("mol2cap", "CCCO", [BEST, SECOND]) == MOL2CAP_TWO_SHOT


def test_cap2mol_reversed_byte_exact():
    assert render("cap2mol", "The molecule is propanol.", [BEST, SECOND]) == CAP2MOL_TWO_SHOT


def test_ranked_order_puts_best_first():
    text = render("mol2cap", "CCCO", [BEST, SECOND], order="ranked")
    assert text.index("CCO\nCaption") < text.index("CC(=O)O\nCaption")


def test_inference_text_is_stripped_and_optionally_primed():
    p = build_prompt("mol2cap", "CCCO", [BEST, SECOND])
    assert p.text == MOL2CAP_TWO_SHOT.strip()
    assert p.text.endswith("molecule: CCCO.")
    primed = build_prompt("mol2cap", "CCCO", [BEST, SECOND], prime_answer=True)
    assert primed.text == MOL2CAP_TWO_SHOT.strip() + "\nCaption:"
    c = build_prompt("cap2mol", "The molecule is propanol.", [BEST], prime_answer=True)
    assert c.text.endswith("for the caption: The molecule is propanol.\nMolecule:")


def test_zero_shot_forms():
    assert render("mol2cap", "CCO", []) == "Generate a caption for the molecule: CCO\n"
    assert render("cap2mol", "A caption.", []) == "Generate a molecule for the caption: A caption.\n"


def test_training_text_is_prompt_plus_answer_plus_eos():
    text = training_text("mol2cap", "CCCO", "The molecule is propanol.", [BEST, SECOND])
    assert text == MOL2CAP_TWO_SHOT + "Caption: The molecule is propanol.</s>"
    text = training_text("cap2mol", "The molecule is propanol.", "CCCO", [BEST, SECOND], eos="<|e|>")
    assert text == CAP2MOL_TWO_SHOT + "Molecule: CCCO<|e|>"


def test_doubled_backslashes_are_written_as_in_the_corpus():
    ex = Example(smiles="C/C=C\\\\C", caption="c")
    assert "molecule: C/C=C\\\\C\nCaption: c" in render("mol2cap", "C", [ex])


def chars(text):
    return len(text)


def test_budget_drops_lowest_ranked_first_and_reports():
    full = build_prompt("mol2cap", "CCCO", [BEST, SECOND], count_tokens=chars, cutoff=10_000,
                        reserve=10)
    assert len(full.examples) == 2 and full.n_tokens == len(full.text)
    one = build_prompt("mol2cap", "CCCO", [BEST, SECOND], count_tokens=chars,
                       cutoff=full.n_tokens + 10 - 1, reserve=10)
    assert [e.cid for e in one.examples] == ["702"]  # the best one stays
    assert [e.cid for e in one.dropped] == ["176"]
    assert one.n_tokens + 10 <= full.n_tokens + 10 - 1
    assert "CCCO" in one.text


def test_budget_never_cuts_the_query():
    with pytest.raises(PromptTooLongError, match="query alone"):
        build_prompt("mol2cap", "C" * 500, [BEST], count_tokens=chars, cutoff=300, reserve=10)


def test_budget_with_a_real_tokenizer(shared):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(shared / "models/scibert_scivocab_uncased"))
    count = hf_token_counter(tok)
    full = build_prompt("cap2mol", "The molecule is propanol.", [BEST, SECOND], count_tokens=count,
                        cutoff=4096, reserve=256)
    assert full.n_tokens == len(tok(full.text)["input_ids"]) > 20
    smaller = build_prompt("cap2mol", "The molecule is propanol.", [BEST, SECOND],
                           count_tokens=count, cutoff=full.n_tokens + 256 - 1, reserve=256)
    assert len(smaller.examples) == 1


def test_bad_inputs_name_the_field():
    with pytest.raises(InputError, match="smiles: empty"):
        render("mol2cap", "  ", [])
    with pytest.raises(InputError, match="caption: empty"):
        render("cap2mol", "", [])
    with pytest.raises(InputError, match="task"):
        render("translate", "CCO", [])
    with pytest.raises(InputError, match="max_new_tokens"):
        build_prompt("mol2cap", "CCO", [], count_tokens=chars, cutoff=100, reserve=100)


@pytest.mark.parametrize("generated,expected", [
    (" The molecule is ethanol.</s>", "The molecule is ethanol."),
    ("\nCaption: The molecule is ethanol.\n\nGenerate a caption", "The molecule is ethanol."),
    ("The molecule is X. It has a role as a Caption: holder.", "The molecule is X. It has a role as a Caption: holder."),
    ("", ""),
])
def test_extract_caption(generated, expected):
    assert extract_answer("mol2cap", generated) == expected


def test_extract_molecule_stops_at_eos_and_line_end():
    assert extract_answer("cap2mol", "\nMolecule: CCO\nsomething", stop=["</s>"]) == "CCO"
    assert extract_answer("cap2mol", " CC(=O)O<|im_end|>junk", stop=["<|im_end|>"]) == "CC(=O)O"
    full = MOL2CAP_TWO_SHOT.strip() + "\nCaption: The molecule is propanol.</s>"
    assert extract_answer("mol2cap", full) == "The molecule is propanol."
