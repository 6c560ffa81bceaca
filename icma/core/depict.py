"""Structure drawings (RDKit SVG), optionally with the atoms a molecule shares with another.

What the web page shows next to every molecule: the query, each retrieved example with the
atoms it has in common with the query highlighted (their maximum common substructure, MCS), a
generated molecule. Drawing and MCS are bounded: the molecules' heavy atoms by
``ICMA_DEPICT_MAX_HEAVY_ATOMS`` (laying out a large molecule is what costs, and RDKit's MCS
spends seconds before its time limit applies: ``benchmarks/results/depict.md``), the picture's
size by ``SIZE_BOUNDS``, and the MCS search by a time limit (RDKit stops it and keeps the largest
common substructure found so far, which the result marks as incomplete). Drawings are kept in a
small in-process cache: a page asks for the same examples again and again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rdkit import Chem
from rdkit.Chem import rdFMCS
from rdkit.Chem.Draw import rdMolDraw2D

from icma.core.chem import heavy_atoms, parse_smiles
from icma.core.errors import InputError

#: Width and height of a drawing, in pixels (the SVG's own size; a browser scales it).
SIZE_BOUNDS = (64, 1200)
DEFAULT_SIZE = (320, 240)
#: Fill of the shared atoms and bonds: a light teal, legible under black atom labels.
SHARED_COLOUR = (0.55, 0.85, 0.80)
CACHE_ENTRIES = 1024
#: The setting that bounds what is drawn (named in the errors).
DRAWN_ATOMS_SETTING = "ICMA_DEPICT_MAX_HEAVY_ATOMS"


@dataclass(frozen=True)
class Depiction:
    svg: str
    heavy_atoms: int
    #: atoms highlighted as shared with the reference; None when no reference was given
    shared_atoms: int | None = None
    #: False when the MCS search hit its time limit (the highlight is what was found by then)
    mcs_complete: bool | None = None


def depict(smiles: str, *, reference: str | None = None, width: int = DEFAULT_SIZE[0],
           height: int = DEFAULT_SIZE[1], max_heavy_atoms: int | None = None,
           max_drawn_atoms: int | None = None, mcs_timeout_s: int = 1) -> Depiction:
    """``smiles`` drawn as SVG; with ``reference``, the atoms of its MCS with the reference
    highlighted. ``max_heavy_atoms`` bounds what is parsed (the query limit), ``max_drawn_atoms``
    what is drawn (``ICMA_DEPICT_MAX_HEAVY_ATOMS``: drawing costs far more than parsing). Raises
    InputError naming ``smiles``, ``reference``, ``width`` or ``height``."""
    check_size(width, "width")
    check_size(height, "height")
    # Parse here, not in the cached function: errors are raised fresh and the cache key is the
    # canonical form, so spellings of one molecule share an entry.
    keys = []
    for field, text in (("smiles", smiles), ("reference", reference)):
        if text is None:
            keys.append(None)
            continue
        mol = parse_smiles(text, field=field, max_heavy_atoms=max_heavy_atoms)
        atoms = heavy_atoms(mol)
        if max_drawn_atoms is not None and atoms > max_drawn_atoms:
            raise InputError(f"the molecule has {atoms} heavy atoms, more than the limit of "
                             f"{max_drawn_atoms} for drawings ({DRAWN_ATOMS_SETTING})",
                             field=field)
        keys.append(Chem.MolToSmiles(mol))
    return _draw(keys[0], keys[1], width, height, mcs_timeout_s)


@lru_cache(maxsize=CACHE_ENTRIES)
def _draw(canonical: str, reference: str | None, width: int, height: int,
          mcs_timeout_s: int) -> Depiction:
    mol = _reparse(canonical, "smiles")
    atoms: list[int] = []
    bonds: list[int] = []
    complete = None
    if reference is not None:
        atoms, bonds, complete = shared_substructure(mol, _reparse(reference, "reference"),
                                                     mcs_timeout_s)
    drawer = rdMolDraw2D.MolDraw2DSVG(width, height)
    opts = drawer.drawOptions()
    opts.clearBackground = False  # the page's card colour shows through
    opts.addStereoAnnotation = True
    colours = {i: SHARED_COLOUR for i in atoms}
    rdMolDraw2D.PrepareAndDrawMolecule(
        drawer, mol, highlightAtoms=atoms, highlightBonds=bonds,
        highlightAtomColors=colours, highlightBondColors={i: SHARED_COLOUR for i in bonds})
    drawer.FinishDrawing()
    svg = drawer.GetDrawingText()
    # RDKit's SVG starts with an XML declaration, which is not allowed inside an HTML page.
    svg = svg[svg.index("<svg"):]
    return Depiction(svg, heavy_atoms(mol), len(atoms) if reference is not None else None, complete)


def _reparse(canonical: str, field: str) -> Chem.Mol:
    """The molecule back from its canonical SMILES (the cache key). RDKit writes a few
    canonical SMILES it cannot read back; those are refused, not a 500."""
    mol = Chem.MolFromSmiles(canonical)
    if mol is None:
        raise InputError(f"RDKit cannot draw this molecule: its canonical SMILES {canonical!r} "
                         "does not parse back", field=field)
    return mol


def shared_substructure(mol: Chem.Mol, reference: Chem.Mol,
                        timeout_s: int) -> tuple[list[int], list[int], bool]:
    """Atom and bond indices of ``mol`` in its maximum common substructure with ``reference``,
    and whether the search finished within ``timeout_s``. Rings match only rings and only whole
    rings: half a benzene "shared" with a chain is not what a chemist calls shared."""
    result = rdFMCS.FindMCS([mol, reference], timeout=max(1, int(timeout_s)),
                            ringMatchesRingOnly=True, completeRingsOnly=True,
                            atomCompare=rdFMCS.AtomCompare.CompareElements,
                            bondCompare=rdFMCS.BondCompare.CompareOrder)
    if result.numAtoms == 0 or not result.smartsString:
        return [], [], not result.canceled
    pattern = Chem.MolFromSmarts(result.smartsString)
    match = mol.GetSubstructMatch(pattern) if pattern is not None else ()
    if not match:
        return [], [], not result.canceled
    bonds = []
    for bond in pattern.GetBonds():
        b = mol.GetBondBetweenAtoms(match[bond.GetBeginAtomIdx()], match[bond.GetEndAtomIdx()])
        if b is not None:
            bonds.append(b.GetIdx())
    return list(match), bonds, not result.canceled


def check_size(value, name: str) -> None:
    """Raise InputError unless ``value`` is a drawing size in ``SIZE_BOUNDS``."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not SIZE_BOUNDS[0] <= value <= SIZE_BOUNDS[1]:
        raise InputError(f"{name} must be a whole number of pixels from {SIZE_BOUNDS[0]} to "
                         f"{SIZE_BOUNDS[1]}, got {value!r}", field=name)
