"""RDKit chemistry: parsing, canonical forms, fingerprints and the GNN graph featurisation."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import rdFingerprintGenerator

from icma.core.errors import InputError

# RDKit prints parse failures to stderr on its own; we report them ourselves, with the reason.
RDLogger.DisableLog("rdApp.*")

MAX_SMILES_CHARS = 4096
#: The setting that bounds the heavy atoms of a query (named in the errors, so a client or an
#: operator knows what to change).
HEAVY_ATOMS_SETTING = "ICMA_MAX_HEAVY_ATOMS"
_WHITESPACE = re.compile(r"\s")


def parse_smiles(smiles: str, *, field: str = "smiles",
                 max_heavy_atoms: int | None = None) -> Chem.Mol:
    """Parse and sanitise a SMILES string, or raise InputError saying why it is not a molecule.

    Leading and trailing whitespace is ignored; whitespace inside is an error, because RDKit reads
    what follows it as the molecule's name and would silently drop it. ``max_heavy_atoms`` (the
    ``ICMA_MAX_HEAVY_ATOMS`` setting where a client sends the query) refuses larger molecules
    before sanitisation, which is what costs seconds for thousands of atoms (see
    benchmarks/results/atoms.md)."""
    if not isinstance(smiles, str) or not smiles.strip():
        raise InputError("empty SMILES", field=field)
    if len(smiles) > MAX_SMILES_CHARS:
        raise InputError(f"SMILES longer than {MAX_SMILES_CHARS} characters", field=field)
    text = smiles.strip()
    gap = _WHITESPACE.search(text)
    if gap:
        at = smiles.index(text) + gap.start()
        raise InputError(
            f"SMILES contains whitespace ({gap.group()!r} at character {at + 1}): "
            f"{_clip(repr(smiles))}; RDKit would read only {_clip(repr(text[:gap.start()]))} "
            "and take the rest for a name", field=field)
    # Parse without sanitising first so that a chemistry problem (valence, kekulisation) can be
    # told apart from a syntax error and reported with RDKit's own reason.
    mol = Chem.MolFromSmiles(text, sanitize=False)
    if mol is None:
        raise InputError(f"not a valid SMILES (syntax): {_clip(text)}", field=field)
    if max_heavy_atoms is not None:
        heavy = heavy_atoms(mol)
        if heavy > max_heavy_atoms:
            raise InputError(
                f"the molecule has {heavy} heavy atoms, more than the limit of "
                f"{max_heavy_atoms} ({HEAVY_ATOMS_SETTING})", field=field)
    try:
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises several unrelated exception types here
        raise InputError(f"not a valid molecule ({exc}): {_clip(text)}", field=field) from None
    if mol.GetNumAtoms() == 0:
        raise InputError(f"SMILES has no atoms: {_clip(text)}", field=field)
    return mol


def heavy_atoms(mol: Chem.Mol) -> int:
    """Atoms other than hydrogen, dummy atoms (``*``) included: they cost as much as carbons
    (RDKit's GetNumHeavyAtoms leaves them out)."""
    return mol.GetNumAtoms() - sum(1 for a in mol.GetAtoms() if a.GetAtomicNum() == 1)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def canonical_smiles(smiles: str, *, field: str = "smiles",
                     max_heavy_atoms: int | None = None) -> str:
    """RDKit canonical isomeric SMILES. ChEBI-20's doubled backslashes parse like single ones."""
    return Chem.MolToSmiles(parse_smiles(smiles, field=field, max_heavy_atoms=max_heavy_atoms))


def try_canonical(smiles: str, max_heavy_atoms: int | None = None
                  ) -> tuple[str | None, str | None]:
    """(canonical SMILES, None) or (None, reason): for bulk loading where failures are counted."""
    try:
        return canonical_smiles(smiles, max_heavy_atoms=max_heavy_atoms), None
    except InputError as exc:
        return None, str(exc)


def inchi(mol: Chem.Mol) -> str | None:
    try:
        return Chem.MolToInchi(mol) or None
    except Exception:
        return None


# --- fingerprints -------------------------------------------------------------------------------

_MORGAN = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)

#: Arguments of RDKit's ``FingerprintMols.FingerprintMol`` defaults, which MolReGPT (and ICMA's
#: "morgan" baseline) really used: a path fingerprint of 1..7 bonds, 2048 bits, 2 bits per path,
#: folded in halves while its density stays under 0.3 and it is longer than 64 bits.
RDKIT_PATH_ARGS = dict(
    minPath=1, maxPath=7, fpSize=2048, nBitsPerHash=2, useHs=False, tgtDensity=0.3, minSize=64
)


def morgan_fp(mol: Chem.Mol) -> DataStructs.ExplicitBitVect:
    """Morgan (ECFP4-like): radius 2, 2048 bits."""
    return _MORGAN.GetFingerprint(mol)


def rdkit_path_fp(mol: Chem.Mol) -> DataStructs.ExplicitBitVect:
    """RDKit topological path fingerprint as MolReGPT computed it (its length varies by folding)."""
    return Chem.RDKFingerprint(mol, **RDKIT_PATH_ARGS)


# --- graph featurisation for the pretrain-gnns / Mole-BERT family -------------------------------

#: Index 119 of the atom table is the mask token; we also use it for atoms with no element
#: (atomic number 0, the "*" dummy atom), which the original featuriser could not encode.
ATOM_MASK = 119
CHIRALITY = [
    Chem.ChiralType.CHI_UNSPECIFIED,
    Chem.ChiralType.CHI_TETRAHEDRAL_CW,
    Chem.ChiralType.CHI_TETRAHEDRAL_CCW,
    Chem.ChiralType.CHI_OTHER,
]
BOND_TYPES = [
    Chem.BondType.SINGLE,
    Chem.BondType.DOUBLE,
    Chem.BondType.TRIPLE,
    Chem.BondType.AROMATIC,
]
BOND_SELF_LOOP = 4  # the checkpoints' row 5 is pre-training's mask token: never featurised here
BOND_DIRS = [Chem.BondDir.NONE, Chem.BondDir.ENDUPRIGHT, Chem.BondDir.ENDDOWNRIGHT]

_CHIRAL_INDEX = {t: i for i, t in enumerate(CHIRALITY)}
_BOND_INDEX = {t: i for i, t in enumerate(BOND_TYPES)}
_DIR_INDEX = {d: i for i, d in enumerate(BOND_DIRS)}


@dataclass(frozen=True)
class MolGraph:
    """Integer features of one molecule: x (n, 2), edge_index (2, 2b), edge_attr (2b, 2)."""

    x: np.ndarray
    edge_index: np.ndarray
    edge_attr: np.ndarray


def featurize(mol: Chem.Mol) -> MolGraph:
    """Featurise as pretrain-gnns does: no hydrogens added, two directed edges per bond.

    Features outside the original vocabularies (which would crash the original code) are
    mapped deliberately: atomic number 0 -> the mask token, newer chirality tags (tetrahedral,
    allene, square planar...) -> CHI_OTHER, dative and other bond types -> SINGLE, bond
    directions other than none/end-up-right/end-down-right -> NONE.
    """
    atoms = mol.GetAtoms()
    x = np.empty((mol.GetNumAtoms(), 2), dtype=np.int64)
    for i, atom in enumerate(atoms):
        z = atom.GetAtomicNum()
        x[i, 0] = z - 1 if 1 <= z <= ATOM_MASK else ATOM_MASK
        x[i, 1] = _CHIRAL_INDEX.get(atom.GetChiralTag(), 3)
    n_bonds = mol.GetNumBonds()
    edge_index = np.empty((2, 2 * n_bonds), dtype=np.int64)
    edge_attr = np.empty((2 * n_bonds, 2), dtype=np.int64)
    for j, bond in enumerate(mol.GetBonds()):
        a, b = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        feat = (_BOND_INDEX.get(bond.GetBondType(), 0), _DIR_INDEX.get(bond.GetBondDir(), 0))
        edge_index[:, 2 * j] = (a, b)
        edge_index[:, 2 * j + 1] = (b, a)
        edge_attr[2 * j] = feat
        edge_attr[2 * j + 1] = feat
    return MolGraph(x=x, edge_index=edge_index, edge_attr=edge_attr)
