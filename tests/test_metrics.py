"""MolT5's metrics pinned to MolT5-large's outputs on ChEBI-20 test (values checked independently
against MolT5's evaluation scripts' recipe), plus small cases with known answers."""

import gzip
import math
import random
from pathlib import Path

import pytest

from icma.evaluation import metrics
from icma.core.errors import InputError
from icma.core.settings import get_settings
from icma.evaluation.metrics import (
    LEXNAMES,
    WordNetMissingError,
    caption_scores,
    caption_tokens,
    chemnet_inputs,
    fcd_score,
    levenshtein,
    lexnames_text,
    molecule_scores,
    prepare_wordnet,
)

PREDICTIONS = "data/molt5-predictions"


def molt5_rows(shared, name):
    lines = (shared / PREDICTIONS / name).read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t") for line in lines]


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Every metric must work offline: fail loudly if anything asks nltk to download."""
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError(f"nltk.download called: {args} {kwargs}")

    monkeypatch.setattr(nltk, "download", refuse)


# --- captions ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def molt5_caption_scores(shared):
    rows = molt5_rows(shared, "molt5-large-smiles2caption.txt")
    return caption_scores([r[2] for r in rows], [r[1] for r in rows],
                          data_dir=get_settings().data_dir)


def test_scibert_word_pieces():
    assert caption_tokens("The molecule is a quinolinemonocarboxylate that is the conjugate base "
                          "of xanthurenic acid.") == (
        "the molecule is a quin ##oline ##mon ##ocar ##box ##ylate that is the conjugate base of "
        "xanth ##uren ##ic acid .").split()


def test_word_pieces_truncate_at_512_like_molt5():
    # MolT5's tokenize(truncation=True, max_length=512) adds no [CLS]/[SEP]: 512 word pieces stay.
    text = " ".join(["acid"] * 600)
    assert caption_tokens(text) == ["acid"] * 512
    assert caption_tokens("[CLS] the molecule [SEP]") == ["the", "molecule"]


def test_molt5_large_caption_scores(molt5_caption_scores):
    s = molt5_caption_scores
    assert s["n"] == 3300
    for key, want in {"bleu2": 0.588, "bleu4": 0.502, "rouge1": 0.653, "rouge2": 0.508,
                      "rougeL": 0.593, "meteor": 0.614}.items():
        assert s[key] == pytest.approx(want, abs=1e-3), key


def test_identical_and_disjoint():
    caption = "The molecule is an alkane with five carbons."
    same = caption_scores([caption] * 2, [caption] * 2, data_dir=get_settings().data_dir)
    assert same["bleu2"] == pytest.approx(1.0) and same["bleu4"] == pytest.approx(1.0)
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    # METEOR's fragmentation penalty keeps even a perfect match just under 1: 0.5 * (1/10)^3.
    assert same["meteor"] == pytest.approx(1 - 0.5 * (1 / 10) ** 3, abs=1e-3)
    none = caption_scores(["zzz qqq"], ["The molecule is ethanol."],
                          data_dir=get_settings().data_dir)
    assert none["bleu2"] == 0.0 and none["rouge1"] == 0.0 and none["meteor"] == 0.0
    with pytest.raises(InputError, match="predictions"):
        caption_scores(["a"], [], data_dir=get_settings().data_dir)
    with pytest.raises(InputError, match="no predictions"):
        caption_scores([], [], data_dir=get_settings().data_dir)


def test_empty_caption_scores_zero():
    s = caption_scores(["", "The molecule is ethanol."], ["The molecule is ethanol."] * 2,
                       data_dir=get_settings().data_dir)
    assert 0.45 < s["meteor"] < 0.5  # (0 + just under 1) / 2
    assert s["rouge1"] == pytest.approx(0.5)


def test_meteor_can_be_left_out():
    s = caption_scores(["The molecule is ethanol."], ["The molecule is ethanol."], meteor=False)
    assert "meteor" not in s and s["bleu2"] == pytest.approx(1.0)


def test_meteor_matches_wordnet_synonyms():
    # "hound" shares a WordNet synset with "dog" (a cad): only WordNet can match the two.
    from nltk.translate.meteor_score import meteor_score

    wn = metrics.wordnet_reader(get_settings().data_dir)
    ref = ["the", "dog", "is", "hot"]
    synonym = meteor_score([ref], ["the", "hound", "is", "hot"], wordnet=wn)
    unrelated = meteor_score([ref], ["the", "zzyzx", "is", "hot"], wordnet=wn)
    assert synonym > unrelated + 0.1


# --- WordNet from Debian's files -----------------------------------------------------------------

def test_lexnames_format():
    lines = lexnames_text().splitlines()
    assert len(lines) == len(LEXNAMES) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"
    assert {line.split("\t")[2] for line in lines} == {"1", "2", "3", "4"}


def test_lexnames_agree_with_debian_manual():
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.exists():
        pytest.skip("Debian's lexnames(5WN) manual page is not installed")
    rows = [line.split("\t") for line in gzip.open(page, "rt", encoding="utf-8", errors="replace")
            if line[:2].isdigit() and "\t" in line]
    assert [(int(r[0]), r[1].strip()) for r in rows] == list(enumerate(LEXNAMES))


def test_prepare_wordnet_builds_nltk_layout(tmp_path, monkeypatch):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = prepare_wordnet(tmp_path / "nltk_data")
    # nltk reads corpora only from folders on its search path.
    monkeypatch.setattr(nltk.data, "path", [str(root), *nltk.data.path])
    folder = root / "corpora" / "wordnet"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*metrics.WORDNET_FILES, "lexnames", "README"])
    assert [p.name for p in folder.parent.iterdir()] == ["wordnet"]  # no staging left behind
    stamp = (folder / "data.noun").stat().st_mtime_ns
    assert prepare_wordnet(tmp_path / "nltk_data") == root  # idempotent: nothing rewritten
    assert (folder / "data.noun").stat().st_mtime_ns == stamp
    with pytest.warns(UserWarning, match="multilingual"):  # no Open Multilingual WordNet: fine
        wn = WordNetCorpusReader(str(folder), None)
    assert wn.get_version() == "3.0"
    # The generated lexnames decide these names: a wrong numbering shows here.
    assert wn.synset("dog.n.01").lexname() == "noun.animal"
    assert wn.synset("run.v.01").lexname() == "verb.motion"
    assert wn.synset("good.a.01").lexname() == "adj.all"


def test_prepare_wordnet_replaces_an_incomplete_folder(tmp_path):
    folder = tmp_path / "corpora" / "wordnet"
    folder.mkdir(parents=True)
    (folder / "lexnames").write_text("broken\n")
    prepare_wordnet(tmp_path)
    assert (folder / "data.noun").is_file() and (folder / "lexnames").read_text() == lexnames_text()


def test_missing_debian_wordnet_names_the_apt_command(tmp_path):
    with pytest.raises(WordNetMissingError) as err:
        prepare_wordnet(tmp_path / "out", source=tmp_path / "nowhere")
    message = str(err.value)
    assert "apt-get install" in message and "wordnet-base" in message
    assert "wordnet-sense-index" in message
    assert not (tmp_path / "out" / "corpora" / "wordnet").exists()


def test_nltk_finds_our_wordnet():
    import nltk

    metrics.wordnet_reader(get_settings().data_dir)
    found = Path(str(nltk.data.find("corpora/wordnet")))
    assert found == metrics.nltk_data_dir(get_settings().data_dir) / "corpora" / "wordnet"


# --- molecules -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def molt5_molecule_scores(shared):
    rows = molt5_rows(shared, "molt5-large-caption2smiles.txt")
    return molecule_scores([r[2] for r in rows], [r[1] for r in rows])


MEASURED_FCD = 0.3817  # fcd 1.2.2, ChemNet's 350-token input, CPU; see fcd_score


@pytest.mark.slow
def test_molt5_large_molecule_scores(molt5_molecule_scores):
    s = molt5_molecule_scores
    assert s["n"] == 3300 and s["n_valid"] == 3163
    for key, want in {"bleu": 0.858, "exact_match": 0.318, "levenshtein": 15.957,
                      "validity": 0.958, "maccs_fts": 0.889, "rdk_fts": 0.807,
                      "morgan_fts": 0.750}.items():
        assert s[key] == pytest.approx(want, abs=1e-3), key


@pytest.mark.slow
def test_molt5_large_fcd_is_stable(molt5_molecule_scores):
    value = molt5_molecule_scores["fcd"]
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(MEASURED_FCD, abs=0.005)


def test_identical_molecules():
    # (4+ characters each: nltk counts a too-short hypothesis as one unmatched 4-gram.)
    smiles = ["CCCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O"]
    s = molecule_scores(smiles, smiles, fcd=False)
    assert s["exact_match"] == 1.0 and s["levenshtein"] == 0.0 and s["validity"] == 1.0
    assert s["maccs_fts"] == s["rdk_fts"] == s["morgan_fts"] == 1.0
    assert s["bleu"] == pytest.approx(1.0) and s["fcd"] is None


def test_same_molecule_written_differently_matches_exactly():
    s = molecule_scores(["OCC"], ["CCO"], fcd=False)
    assert s["exact_match"] == 1.0 and s["levenshtein"] == 2.0 and s["morgan_fts"] == 1.0


def test_stereo_only_difference_is_no_exact_match():
    s = molecule_scores(["C/C=C/C", "N[C@H](C)C(=O)O"], ["C/C=C\\C", "N[C@@H](C)C(=O)O"],
                        fcd=False)
    assert s["exact_match"] == 0.0 and s["validity"] == 1.0
    assert s["levenshtein"] == 1.0  # one character each
    assert s["maccs_fts"] == 1.0  # MACCS keys do not see stereo


def test_empty_and_invalid_predictions():
    refs = ["CCO", "CCN", "CCC", "c1ccccc1"]
    s = molecule_scores(["CCO", "", "C1CC", "c1ccccc1"], refs, fcd=False)
    assert s["validity"] == 0.5 and s["n_valid"] == 2
    assert s["exact_match"] == 0.5  # over all samples: invalid ones count as misses
    assert s["levenshtein"] == pytest.approx((0 + 3 + 1 + 0) / 4)  # "" -> "CCN" is 3 edits
    assert s["maccs_fts"] == 1.0  # averaged over the valid predictions only
    bad = molecule_scores(["", "not a smiles"], ["CCO", "CCN"], fcd=False)
    assert bad["validity"] == 0.0 and bad["exact_match"] == 0.0 and bad["bleu"] == 0.0
    assert bad["maccs_fts"] is None and bad["rdk_fts"] is None and bad["morgan_fts"] is None


def test_doubled_backslashes_count_as_single():
    # ChEBI-20 files write C/C=C\\C; a model writing C/C=C\C wrote the same molecule.
    s = molecule_scores(["CC/C=C\\CCO"], ["CC/C=C\\\\CCO"], fcd=False)
    assert s["levenshtein"] == 0.0 and s["exact_match"] == 1.0 and s["bleu"] == pytest.approx(1.0)


def test_molecules_without_inchi_compare_by_canonical_smiles():
    # InChI has no dummy atoms; MolT5 would call any two such molecules a match ("" == "").
    s = molecule_scores(["*CC", "*CCC"], ["CC*", "*CC"], fcd=False)
    assert s["exact_match"] == 0.5


def test_molecule_scores_reject_mismatched_counts():
    with pytest.raises(InputError, match="2 predictions for 1 references"):
        molecule_scores(["C", "CC"], ["C"], fcd=False)


def test_levenshtein_known_values_and_brute_force():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "CCO") == levenshtein("CCO", "") == 3
    assert levenshtein("", "") == 0 and levenshtein("CCO", "CCO") == 0

    def table(a, b):  # the textbook dynamic programme
        row = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
        return row[-1]

    rng = random.Random(7)
    for _ in range(2000):
        a = "".join(rng.choice("CNO()=1") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("CNO()=1") for _ in range(rng.randint(0, 70)))
        assert levenshtein(a, b) == table(a, b), (a, b)


def test_fcd_small_sets():
    a = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "CCCCCl"]
    b = ["CCO", "CCC", "CCCl", "OCCO", "c1ccncc1"]
    assert fcd_score(a, a) == pytest.approx(0.0, abs=1e-3)
    assert fcd_score(a, b) > 1.0
    assert fcd_score(a, ["CCO", "not a smiles", ""]) is None  # one valid molecule: no covariance


def test_chemnet_inputs_are_canonical_and_cut_to_350_tokens():
    assert chemnet_inputs(["OCC", "", "C1CC"]) == ["CCO"]
    long_chain = "C" * 200 + "C(Cl)" + "C" * 300  # 507 tokens
    (cut,) = chemnet_inputs([long_chain])
    from fcd.utils import tokenize

    assert len(tokenize(cut)) == 349  # plus ChemNet's end token: 350
