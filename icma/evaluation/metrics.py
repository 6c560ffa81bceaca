"""MolT5's evaluation metrics, with MolT5's ``evaluation/`` scripts as the reference. Where inputs
MolT5 never met would trip its scripts, and for FCD's input length, the choice made is in the
docstrings of smiles_text, parse_molecule, same_molecule and fcd_score.

mol2cap: BLEU-2/4 and METEOR on SciBERT word pieces, ROUGE-1/2/L F-measure on the raw text.
cap2mol: character BLEU, exact match by InChI, Levenshtein, validity, MACCS/RDK/Morgan Tanimoto,
FCD. Text2Mol needs weights that are not available; it is reported as not computed.

METEOR needs WordNet 3.0. It comes from Debian's ``wordnet-base`` and ``wordnet-sense-index``,
copied into an nltk_data folder of the data directory by :func:`prepare_wordnet`; nothing is
ever downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Sequence

from icma.core.errors import IcmaError, InputError
from icma.core.settings import PACKAGE_DATA
from icma.core.tasks import check_task

log = logging.getLogger(__name__)

SCIBERT_DIR = PACKAGE_DATA / "scibert"
CAPTION_TOKENIZER = "SciBERT scivocab uncased WordPiece (MolT5 recipe)"
TEXT2MOL = "not computed (weights unavailable)"
MAX_CAPTION_PIECES = 512  # MolT5's text_trunc_length


# --- captions: tokens, BLEU, ROUGE, METEOR -----------------------------------------------------

@lru_cache(maxsize=1)
def scibert_tokenizer():
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(SCIBERT_DIR))
    # transformers silently builds a 5-token vocabulary from a bad vocab argument; a caption
    # that comes out as [UNK] means the real vocabulary did not load.
    if tok.vocab_size < 30000 or tok.tokenize("the molecule")[0] == "[UNK]":
        raise RuntimeError(f"SciBERT vocabulary did not load from {SCIBERT_DIR}")
    return tok


def caption_tokens(text: str) -> list[str]:
    """SciBERT word pieces as MolT5 counts them: the first 512 pieces, special tokens dropped.

    MolT5 calls ``tokenize(..., truncation=True, max_length=512)``, which adds no [CLS]/[SEP], so
    the 512 are all word pieces; a literal "[CLS]" in the text is a special token and dropped too.
    """
    tok = scibert_tokenizer()
    ids = tok(text, add_special_tokens=False, truncation=True,
              max_length=MAX_CAPTION_PIECES)["input_ids"]
    return [t for t in tok.convert_ids_to_tokens(ids) if t not in ("[PAD]", "[CLS]", "[SEP]")]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions for {len(references)} references",
                         field="predictions")
    if not predictions:
        raise InputError("no predictions to score", field="predictions")


def _corpus_bleu(hypotheses: list[list[str]], references: list[list[str]],
                 weights: tuple[float, ...]) -> float:
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        # nltk warns when some n-gram order has no match at all and then returns 0, which is
        # the unsmoothed score MolT5 reports; the warning says nothing more.
        warnings.simplefilter("ignore", UserWarning)
        return float(corpus_bleu([[r] for r in references], hypotheses, weights=weights))


def rouge_means(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure of rouge_score on the raw text (no stemmer), as MolT5."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(p, r)
        for key in totals:
            totals[key] += s[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


def meteor_mean(hypotheses: list[list[str]], references: list[list[str]],
                data_dir: str | Path) -> float:
    """Mean nltk METEOR per sample on word pieces (MolT5: ``meteor_score([gt_tokens], out_tokens)``),
    with the WordNet copy in ``data_dir``."""
    from nltk.translate.meteor_score import meteor_score

    wordnet = wordnet_reader(data_dir)
    total = sum(meteor_score([r], h, wordnet=wordnet) for h, r in zip(hypotheses, references))
    return total / len(hypotheses)


def caption_scores(predictions: Sequence[str], references: Sequence[str], *,
                   data_dir: str | Path | None = None, meteor: bool = True) -> dict[str, float]:
    """BLEU-2/4 (nltk corpus_bleu, no smoothing) and METEOR on SciBERT word pieces, and mean
    ROUGE-1/2/L F-measure (no stemmer); ``meteor=False`` leaves METEOR (and WordNet) out.
    METEOR's WordNet copy is kept in ``data_dir`` (see :func:`nltk_data_dir`)."""
    if meteor and data_dir is None:
        raise TypeError("METEOR needs data_dir= (where its WordNet copy is kept)")
    _check_pairs(predictions, references)
    hyps = [caption_tokens(p) for p in predictions]
    refs = [caption_tokens(r) for r in references]
    scores = {
        "bleu2": _corpus_bleu(hyps, refs, (0.5, 0.5)),
        "bleu4": _corpus_bleu(hyps, refs, (0.25, 0.25, 0.25, 0.25)),
        **rouge_means(predictions, references),
    }
    if meteor:
        scores["meteor"] = meteor_mean(hyps, refs, data_dir)
    scores["n"] = len(predictions)
    return scores


# --- WordNet 3.0 for METEOR, from Debian's files -------------------------------------------------

WORDNET_DEBIAN_DIR = Path("/usr/share/wordnet")
WORDNET_DEBS = ("wordnet-base", "wordnet-sense-index")
WORDNET_APT = ("apt-get update && apt-get install -y --no-install-recommends "
               + " ".join(WORDNET_DEBS))

#: The files nltk's WordNetCorpusReader opens (besides ``lexnames``) and the Debian package
#: that ships each under /usr/share/wordnet.
WORDNET_FILES = {
    **{name: "wordnet-base" for name in (
        "cntlist.rev", "index.adj", "index.adv", "index.noun", "index.verb", "data.adj",
        "data.adv", "data.noun", "data.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")},
    "index.sense": "wordnet-sense-index",
}

#: WordNet 3.0's 45 lexicographer files, numbered 00-44 in this order (lexnames(5WN)). Debian
#: ships no ``lexnames`` file, but the synsets in data.* point into this list by number.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetMissingError(IcmaError):
    """Debian's WordNet 3.0 files are not installed, so METEOR cannot be computed."""


def nltk_data_dir(data_dir: str | Path) -> Path:
    """Where the WordNet copy of a data directory lives: ``<data_dir>/nltk_data``."""
    return Path(data_dir) / "nltk_data"


def lexnames_text() -> str:
    """The ``lexnames`` file: number, name and syntactic category (1 noun .. 4 adv), tab-separated."""
    return "".join(f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                   for i, name in enumerate(LEXNAMES))


def _wordnet_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*WORDNET_FILES, "lexnames"))


def _check_debian_wordnet(source: Path) -> None:
    missing = sorted({deb for name, deb in WORDNET_FILES.items() if not (source / name).is_file()})
    if missing:
        raise WordNetMissingError(
            f"METEOR needs WordNet 3.0 from Debian's {', '.join(missing)} (no {source}/"
            f"{next(n for n, d in WORDNET_FILES.items() if d == missing[0])}); install it as "
            f"root: {WORDNET_APT}", field="wordnet")
    with open(source / "data.adj", encoding="utf-8", errors="replace") as f:
        head = "".join(line for _, line in zip(range(40), f))
    if "WordNet 3.0 Copyright" not in head:
        raise WordNetMissingError(f"{source}/data.adj is not WordNet 3.0, which MolT5's METEOR "
                                  "used", field="wordnet")


def prepare_wordnet(target: Path, source: Path | None = None) -> Path:
    """Build ``<target>/corpora/wordnet`` (nltk's layout) from Debian's WordNet 3.0; return target.

    ``target`` is usually :func:`nltk_data_dir`, ``source`` defaults to /usr/share/wordnet.
    Idempotent: a complete folder is left alone.
    Atomic: the copy is built beside its final place and renamed in, so a reader never sees a
    half-written folder and two processes building at once both end with a complete one.
    """
    target = Path(target)
    final = target / "corpora" / "wordnet"
    if _wordnet_complete(final):
        return target
    source = Path(source) if source is not None else WORDNET_DEBIAN_DIR
    _check_debian_wordnet(source)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=final.parent))
    try:
        for name in WORDNET_FILES:
            shutil.copyfile(source / name, staging / name)
        (staging / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        (staging / "README").write_text(
            f"WordNet 3.0 (Princeton University; WordNet license) copied by icma from {source} "
            f"(Debian {', '.join(WORDNET_DEBS)}); lexnames generated from lexnames(5WN).\n",
            encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private; the copy is shared data
        _move_into_place(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, final: Path) -> None:
    try:
        os.rename(staging, final)
        return
    except OSError:
        if _wordnet_complete(final):  # another process got there first
            return
    # An incomplete folder that we did not make (renames are atomic): set it aside, then swap.
    aside = final.with_name(f".wordnet-incomplete-{os.getpid()}")
    os.rename(final, aside)
    os.rename(staging, final)
    shutil.rmtree(aside, ignore_errors=True)


def use_nltk_data(folder: Path) -> None:
    """Put our nltk_data first on nltk's search path, so every WordNet lookup finds this copy."""
    import nltk

    if str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))


@lru_cache(maxsize=1)
def wordnet_reader(data_dir: str | Path):
    """nltk's WordNet 3.0 reader over our copy in ``data_dir`` (built from Debian's files on
    first use)."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    folder = prepare_wordnet(nltk_data_dir(data_dir))
    # The reader maps sense keys through nltk's "wordnet" corpus by name, so the path matters too.
    use_nltk_data(folder)
    with warnings.catch_warnings():
        # Without Open Multilingual WordNet it warns that other languages are unavailable;
        # METEOR here is English only.
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(folder / "corpora" / "wordnet"), None)


# --- molecules: strings, validity, exact match, fingerprints, FCD --------------------------------

def smiles_text(smiles: str) -> str:
    r"""SMILES as written, with ChEBI-20's doubled backslashes (``C/C=C\\C``) made single.

    Two bond symbols in a row are never valid SMILES, and RDKit reads ``\\`` as ``\``; applied to
    references and predictions alike, string metrics then agree with the molecules.
    """
    return smiles.replace("\\\\", "\\")


def parse_molecule(smiles: str):
    """RDKit molecule, or None: unparsable, or empty (RDKit reads "" as a molecule with no atoms)."""
    from rdkit import Chem

    import icma.core.chem  # noqa: F401  (silences RDKit's own parse-error printing)

    if not smiles.strip():
        return None
    mol = Chem.MolFromSmiles(smiles)
    return mol if mol is not None and mol.GetNumAtoms() else None


def same_molecule(a, b) -> bool:
    """Exact match by InChI (stereo and charge count); canonical SMILES where InChI has none."""
    from rdkit import Chem

    from icma.core.chem import inchi

    ia, ib = inchi(a), inchi(b)
    if ia and ib:
        return ia == ib
    # InChI cannot describe every molecule (e.g. ChEBI's "*" attachment points).
    return Chem.MolToSmiles(a) == Chem.MolToSmiles(b)


def fingerprint_similarities(ref, pred) -> tuple[float, float, float]:
    """Tanimoto of MACCS keys, RDKit path fingerprints and Morgan r=2 unfolded counts."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import MACCSkeys

    maccs = DataStructs.TanimotoSimilarity(MACCSkeys.GenMACCSKeys(ref), MACCSkeys.GenMACCSKeys(pred))
    rdk = DataStructs.TanimotoSimilarity(Chem.RDKFingerprint(ref), Chem.RDKFingerprint(pred))
    morgan = DataStructs.TanimotoSimilarity(_morgan_counts(ref), _morgan_counts(pred))
    return maccs, rdk, morgan


def _morgan_counts(mol):
    # The same sparse count fingerprint as MolT5's AllChem.GetMorganFingerprint(m, 2), which
    # RDKit deprecates in favour of the generator.
    return _morgan_generator().GetSparseCountFingerprint(mol)


@lru_cache(maxsize=1)
def _morgan_generator():
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=2)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; cost 1 each).

    Myers' bit-parallel algorithm (Hyyro's formulation for whole strings): one bit per character
    of the shorter string in a Python integer, one pass over the longer string.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    positions: dict[str, int] = {}
    for i, ch in enumerate(b):
        positions[ch] = positions.get(ch, 0) | (1 << i)
    vp, vn, dist = mask, 0, m  # vertical +1 / -1 deltas of the DP column; dist = bottom cell
    for ch in a:
        eq = positions.get(ch, 0)
        xv = eq | vn
        xh = (((eq & vp) + vp) ^ vp) | eq
        hp = (vn | ~(xh | vp)) & mask
        hn = vp & xh
        if hp & last:
            dist += 1
        elif hn & last:
            dist -= 1
        hp = ((hp << 1) | 1) & mask  # the top row grows by one per character: shift in a +1
        hn = (hn << 1) & mask
        vp = (hn | ~(xv | hp)) & mask
        vn = hp & xv
    return dist


FCD_INPUT_TOKENS = 350  # ChemNet's input length, end token included


def fcd_score(references: Sequence[str], predictions: Sequence[str]) -> float | None:
    """FCD (fcd package, ChemNet) between the reference set and the valid predictions.

    As MolT5: RDKit canonical SMILES of every parsable reference and prediction, one set each.
    Each SMILES is cut to ChemNet's 350-token input as the original FCD (and fcd <= 1.1, which
    MolT5 used) did; fcd 1.2 instead pads each set to its own longest SMILES, which changes every
    activation and puts a gap between two sets of different longest lengths. None when either set
    has fewer than 2 molecules (no covariance) or the covariances are too degenerate for a
    real matrix square root.
    """
    import fcd

    refs = chemnet_inputs(references)
    preds = chemnet_inputs(predictions)
    if len(refs) < 2 or len(preds) < 2:
        return None
    log.info("FCD: ChemNet over %d reference and %d predicted SMILES", len(refs), len(preds))
    with warnings.catch_warnings():
        # fcd 1.2.2 calls numpy and scipy APIs that now warn of their deprecation.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            value = float(fcd.get_fcd(refs, preds, _chemnet()))
        except ValueError as exc:  # fcd's "Imaginary component" on degenerate statistics
            log.warning("FCD not computed: %s", exc)
            return None
    # A squared distance: identical sets come out a rounding error below zero.
    return max(value, 0.0)


def chemnet_inputs(smiles: Sequence[str]) -> list[str]:
    """Canonical SMILES of the parsable entries, each cut to ChemNet's 349 tokens + end token."""
    from fcd.utils import tokenize
    from rdkit import Chem

    out = []
    for s in smiles:
        mol = parse_molecule(s)
        if mol is None:
            continue
        tokens = tokenize(Chem.MolToSmiles(mol))
        out.append("".join(tokens[: FCD_INPUT_TOKENS - 1]))  # room for the end token
    return out


@lru_cache(maxsize=1)
def _chemnet():
    from importlib import resources

    import fcd

    # fcd ships ChemNet inside the package; loading it by path skips fcd's temporary copy.
    with resources.as_file(resources.files("fcd") / "ChemNet_v0.13_pretrained.pt") as path:
        return fcd.load_ref_model(str(path))


def molecule_scores(predictions: Sequence[str], references: Sequence[str], *,
                    fcd: bool = True) -> dict[str, float | int | None]:
    """MolT5's cap2mol metrics over SMILES pairs; ``fcd=False`` skips FCD (ChemNet is slow on CPU).

    bleu: character corpus BLEU; exact_match: InChI equality over all samples (an invalid
    prediction never matches); levenshtein: mean over all samples; validity: share of predictions
    RDKit parses; maccs_fts / rdk_fts / morgan_fts: mean Tanimoto over valid predictions (None
    when there are none).
    """
    _check_pairs(predictions, references)
    preds = [smiles_text(p) for p in predictions]
    refs = [smiles_text(r) for r in references]
    n = len(preds)
    matches, fps = 0, []
    n_valid = 0
    for p, r in zip(preds, refs):
        pm = parse_molecule(p)
        if pm is None:
            continue
        n_valid += 1
        rm = parse_molecule(r)
        if rm is None:  # a reference RDKit cannot read: nothing to compare with
            continue
        matches += same_molecule(pm, rm)
        fps.append(fingerprint_similarities(rm, pm))
    mean_fp = [sum(col) / len(fps) for col in zip(*fps)] if fps else [None, None, None]
    return {
        "bleu": _corpus_bleu([list(p) for p in preds], [list(r) for r in refs],
                             (0.25, 0.25, 0.25, 0.25)),
        "exact_match": matches / n,
        "levenshtein": sum(levenshtein(p, r) for p, r in zip(preds, refs)) / n,
        "validity": n_valid / n,
        "maccs_fts": mean_fp[0],
        "rdk_fts": mean_fp[1],
        "morgan_fts": mean_fp[2],
        "fcd": fcd_score(refs, preds) if fcd else None,
        "n": n,
        "n_valid": n_valid,
    }


# --- whole reports -------------------------------------------------------------------------------

def package_versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def evaluate(task: str, predictions: Sequence[str], references: Sequence[str], *,
             data_dir: str | Path | None = None, fcd: bool = True) -> dict:
    """Every MolT5 metric for one task, with what produced the numbers (tokenizer, versions).
    mol2cap needs ``data_dir``, where METEOR's WordNet copy is kept."""
    if check_task(task) == "mol2cap":
        scores = caption_scores(predictions, references, data_dir=data_dir)
        return {"task": task, **scores, "tokenizer": CAPTION_TOKENIZER, "text2mol": TEXT2MOL,
                "versions": {**package_versions("nltk", "rouge_score", "transformers"),
                             "wordnet": wordnet_reader(data_dir).get_version()}}
    scores = molecule_scores(predictions, references, fcd=fcd)
    report = {"task": task, **scores, "text2mol": TEXT2MOL,
              "versions": package_versions("nltk", "rdkit", "fcd", "torch")}
    if scores["fcd"] is None:
        report["fcd_note"] = ("skipped" if not fcd else
                              "not computed: needs 2 or more valid molecules on each side "
                              "and non-degenerate ChemNet statistics")
    return report


REPORT_ROWS = {
    "mol2cap": [("BLEU-2", "bleu2"), ("BLEU-4", "bleu4"), ("ROUGE-1", "rouge1"),
                ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"), ("METEOR", "meteor")],
    "cap2mol": [("BLEU", "bleu"), ("Exact match", "exact_match"), ("Levenshtein", "levenshtein"),
                ("Validity", "validity"), ("MACCS FTS", "maccs_fts"), ("RDK FTS", "rdk_fts"),
                ("Morgan FTS", "morgan_fts"), ("FCD", "fcd")],
}


def report_lines(report: dict) -> list[str]:
    """An :func:`evaluate` report as a small table for people, with what produced the numbers."""
    lines = []
    for label, key in REPORT_ROWS[report["task"]]:
        value = report[key]
        lines.append(f"  {label:<12} {value:.3f}" if value is not None else
                     f"  {label:<12} {report.get(key + '_note', 'n/a')}")
    lines.append(f"  {'Text2Mol':<12} {report['text2mol']}")
    if "tokenizer" in report:
        lines.append(f"tokenizer: {report['tokenizer']}")
    if "n_valid" in report:
        lines.append(f"valid predictions: {report['n_valid']} of {report['n']} (fingerprints "
                     "averaged over these)")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    return lines
