"""Molecule graph encoders of the pretrain-gnns / Mole-BERT family (GIN, GCN, GraphSAGE, GAT).

This follows ``chem/model.py`` of github.com/snap-stanford/pretrain-gnns (Hu et al., ICLR 2020),
whose layout and state-dict names Mole-BERT (the encoder ICMA retrieved molecules with) shares,
so one implementation loads the checkpoints of both. See ``models/README.md`` in the
reference data folder (``../shared`` beside the repository).

- Atoms: ``x_embedding1[atomic number - 1] + x_embedding2[chirality]``; no hydrogens added.
  The checkpoints have only three chirality rows (unspecified, CW, CCW) although the featuriser
  knows four tags: CHI_OTHER (index 3, which would crash the original code) and any other tag
  beyond the table are read as row 0, "unspecified". Bond directions beyond the table read as 0.
- Bonds: two directed edges per bond; every layer adds a self-loop per atom with bond features
  (4 = self-loop, 0). Edge embedding = ``edge_embedding1[type] + edge_embedding2[direction]``.
- Layers (x_j: source atom, e: edge embedding; all sums run over the edges into an atom):
    GIN        mlp(sum (x_j + e)),  mlp = Linear(d, 2d) -> ReLU -> Linear(2d, d)
    GCN        sum deg_i^-1/2 deg_j^-1/2 (W x_j + b + e),  degrees counting the self-loop
    GraphSAGE  l2normalise(mean (W x_j + b + e))
    GAT        mean over heads of sum softmax_i(a_ij) (W x_j + b + e) + bias,
               a_ij = leaky_relu(att . [W x_i + b, W x_j + b + e], 0.2)
  each followed by BatchNorm1d (running statistics) and ReLU except after the last layer.
  The atom representation is the last layer's (JK = last); a molecule is the mean over its atoms.

How it is computed (exactly the same sums, arranged for speed on a CPU): a batch of molecules is
one disconnected graph. With the edges sorted by target atom, the sum over edges of
``w_e (h_source + e_bond)`` is ``A_w @ h + B_w @ T``, where ``A_w`` is the (atoms x atoms) matrix
of the edge weights (sparse CSR; dense for a batch of at most 64 atoms, such as one query),
``B_w`` the dense (atoms x bond-feature-pairs) matrix of the weights summed per bond-feature pair,
and ``T`` the table of the (at most 6 x 3) possible edge embeddings. No per-edge 300-wide tensor
is ever formed: a sparse product is four times faster than gathering and scatter-adding the
messages. Dropout is absent: this module only runs inference.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icma.core import chem
from icma.core.errors import CheckpointError, InputError
from icma.core.settings import PACKAGE_DATA, Settings

ARCHS = ("gin", "gcn", "graphsage", "gat")
SHIPPED_DIR = PACKAGE_DATA / "encoders"

# Torch warns once per process that sparse CSR support is "beta" (the two operations used here,
# building a CSR matrix and multiplying it by a dense one, are long stable): spend that warning.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), (1, 1))

#: A forward pass takes at most embed_batch_size molecules and at most this many atoms: the
#: activations of larger batches spill out of the CPU caches (and fresh large tensors cost page
#: faults), which made batches of 256 molecules (8,000 atoms) 1.5-2x slower per molecule here.
MAX_BATCH_ATOMS = 1024
# Fewer molecules than this embed without a progress bar even when progress is on.
_PROGRESS_MIN = 2000


# --- a batch of molecules as one graph ---------------------------------------------------------

#: Batches of at most this many atoms propagate with a dense adjacency matrix.
DENSE_MAX_ATOMS = 64
#: How each layer type weights the edges into an atom (None: attention, computed per layer).
EDGE_WEIGHTING = {"gin": "sum", "gcn": "gcn", "graphsage": "mean", "gat": None}


@dataclass(eq=False)
class GraphBatch:
    """Molecules as one disconnected graph with self-loops; edges sorted by (target, source)."""

    atom: Tensor  # (n,) row of the atom table: (atomic number - 1) * n_chirality + chirality
    src: Tensor  # (m,) source atom of each edge, self-loops included
    dst: Tensor  # (m,) target atom, ascending
    bond: Tensor  # (m,) row of the edge table: bond type * n_directions + direction
    crow: Tensor  # (n + 1,) CSR row pointers of the edges grouped by target atom
    sizes: Tensor  # (b,) atoms per molecule
    n_bond_pairs: int  # rows of the edge table
    weights: Tensor | None  # (m,) the layer type's fixed edge weights (None for GAT)
    weights_per_bond: Tensor | None  # (n, n_bond_pairs) the same, summed per atom and bond pair

    @property
    def n_atoms(self) -> int:
        return self.atom.shape[0]

    def adjacency(self, weights: Tensor) -> Tensor:
        """(n, n) matrix with ``weights[e]`` at (dst[e], src[e]): sparse CSR, or dense for a small
        graph (a single query molecule), where a dense product costs less than the sparse setup."""
        n = self.n_atoms
        if n <= DENSE_MAX_ATOMS:
            return torch.zeros(n, n).index_put_((self.dst, self.src), weights)
        return torch.sparse_csr_tensor(self.crow, self.src, weights, (n, n), check_invariants=False)

    def bond_matrix(self, weights: Tensor) -> Tensor:
        """Dense (n, n_bond_pairs): each atom's incoming edge weights summed per bond pair."""
        k = self.n_bond_pairs
        flat = torch.zeros(self.n_atoms * k, dtype=weights.dtype)
        return flat.index_add_(0, self.dst * k + self.bond, weights).view(self.n_atoms, k)

    @cached_property
    def propagator(self) -> tuple[Tensor, Tensor]:
        """(A, B) such that sum_e w_e (h[src_e] + T[bond_e]) into each atom = A @ h + B @ T."""
        return self.adjacency(self.weights), self.weights_per_bond


def collate(graphs: Sequence[chem.MolGraph], n_chirality: int, n_directions: int,
            n_bond_pairs: int, weighting: str | None) -> GraphBatch:
    """Concatenate featurised molecules, add the self-loops, sort the edges by target atom and
    compute the fixed edge weights (all in numpy: cheaper than torch on small arrays)."""
    sizes = np.fromiter((g.x.shape[0] for g in graphs), dtype=np.int64, count=len(graphs))
    n = int(sizes.sum())
    x = np.concatenate([g.x for g in graphs]) if len(graphs) > 1 else graphs[0].x
    edges = np.concatenate([g.edge_index for g in graphs], axis=1)
    if len(graphs) > 1:
        edges = edges + np.repeat(np.cumsum(sizes) - sizes, [g.edge_index.shape[1] for g in graphs])
    attr = np.concatenate([g.edge_attr for g in graphs])
    loops = np.arange(n, dtype=np.int64)
    src = np.concatenate([edges[0], loops])
    dst = np.concatenate([edges[1], loops])
    direction = np.concatenate([attr[:, 1], np.zeros(n, dtype=np.int64)])
    direction[direction >= n_directions] = 0
    bond = np.concatenate([attr[:, 0], np.full(n, chem.BOND_SELF_LOOP, dtype=np.int64)])
    bond = bond * n_directions + direction
    order = np.lexsort((src, dst))
    src, dst, bond = src[order], dst[order], bond[order]
    degree = np.bincount(dst, minlength=n)  # edges into each atom, its self-loop included: >= 1
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(degree, out=crow[1:])
    chirality = x[:, 1].copy()
    chirality[chirality >= n_chirality] = 0  # CHI_OTHER -> unspecified (see the module docstring)
    atom = x[:, 0] * n_chirality + chirality

    weights = per_bond = None
    if weighting is not None:
        deg = degree.astype(np.float32)
        if weighting == "sum":  # GIN
            weights = np.ones(len(src), dtype=np.float32)
        elif weighting == "gcn":  # deg(src)^-1/2 deg(dst)^-1/2
            inv_sqrt = deg ** np.float32(-0.5)
            weights = inv_sqrt[src] * inv_sqrt[dst]
        elif weighting == "mean":  # GraphSAGE
            weights = (np.float32(1) / deg)[dst]
        else:
            raise ValueError(f"unknown edge weighting {weighting!r}")
        per_bond = np.bincount(dst * n_bond_pairs + bond, weights=weights,
                               minlength=n * n_bond_pairs).astype(np.float32)
        weights = torch.from_numpy(weights)
        per_bond = torch.from_numpy(per_bond).view(n, n_bond_pairs)
    t = torch.from_numpy
    return GraphBatch(atom=t(atom), src=t(src), dst=t(dst), bond=t(bond), crow=t(crow),
                      sizes=t(sizes), n_bond_pairs=n_bond_pairs, weights=weights,
                      weights_per_bond=per_bond)


# --- layers ------------------------------------------------------------------------------------
# Each layer's forward takes the atom states, the batch, and its constants: the edge-embedding
# table (and for GAT the attention terms of the table), derived from the weights once.

class _EdgeEmbedding(nn.Module):
    """edge_embedding1[type] + edge_embedding2[direction], as one table over (type, direction)."""

    def __init__(self, n_types: int, n_directions: int, width: int):
        super().__init__()
        self.edge_embedding1 = nn.Embedding(n_types, width)
        self.edge_embedding2 = nn.Embedding(n_directions, width)

    def edge_table(self) -> Tensor:
        e1, e2 = self.edge_embedding1.weight, self.edge_embedding2.weight
        return (e1[:, None, :] + e2[None, :, :]).reshape(-1, e1.shape[1])

    def constants(self) -> dict:
        return {"table": self.edge_table()}


class GINConv(_EdgeEmbedding):
    def __init__(self, emb_dim: int, n_types: int, n_directions: int):
        super().__init__(n_types, n_directions, emb_dim)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, 2 * emb_dim), nn.ReLU(),
                                 nn.Linear(2 * emb_dim, emb_dim))

    def forward(self, x: Tensor, g: GraphBatch, c: dict) -> Tensor:
        a, b = g.propagator  # plain sums
        h = torch.addmm(a @ x, b, c["table"])
        first, last = self.mlp[0], self.mlp[2]
        return F.linear(F.linear(h, first.weight, first.bias).relu_(), last.weight, last.bias)


class GCNConv(_EdgeEmbedding):
    def __init__(self, emb_dim: int, n_types: int, n_directions: int):
        super().__init__(n_types, n_directions, emb_dim)
        self.linear = nn.Linear(emb_dim, emb_dim)

    def forward(self, x: Tensor, g: GraphBatch, c: dict) -> Tensor:
        a, b = g.propagator  # weights deg^-1/2 deg^-1/2
        return torch.addmm(a @ F.linear(x, self.linear.weight, self.linear.bias), b, c["table"])


class GraphSAGEConv(_EdgeEmbedding):
    def __init__(self, emb_dim: int, n_types: int, n_directions: int):
        super().__init__(n_types, n_directions, emb_dim)
        self.linear = nn.Linear(emb_dim, emb_dim)

    def forward(self, x: Tensor, g: GraphBatch, c: dict) -> Tensor:
        a, b = g.propagator  # weights 1 / in-degree: the mean
        h = torch.addmm(a @ F.linear(x, self.linear.weight, self.linear.bias), b, c["table"])
        return F.normalize(h, p=2.0, dim=-1)


class GATConv(_EdgeEmbedding):
    def __init__(self, emb_dim: int, n_types: int, n_directions: int, heads: int = 2,
                 negative_slope: float = 0.2):
        super().__init__(n_types, n_directions, heads * emb_dim)
        self.emb_dim, self.heads, self.negative_slope = emb_dim, heads, negative_slope
        self.weight_linear = nn.Linear(emb_dim, heads * emb_dim)
        self.att = nn.Parameter(torch.empty(1, heads, 2 * emb_dim))
        self.bias = nn.Parameter(torch.empty(emb_dim))

    def constants(self) -> dict:
        d = self.emb_dim
        table = self.edge_table().view(-1, self.heads, d)  # (bond pairs, heads, d)
        att_i, att_j = self.att[0, :, :d], self.att[0, :, d:]  # (heads, d) each
        return {"table": table.transpose(0, 1).contiguous(),  # (heads, bond pairs, d)
                "att_i": att_i, "att_j": att_j, "score_e": (table * att_j).sum(-1)}

    def forward(self, x: Tensor, g: GraphBatch, c: dict) -> Tensor:
        heads = self.heads
        h = F.linear(x, self.weight_linear.weight, self.weight_linear.bias).view(-1, heads,
                                                                                  self.emb_dim)
        # att . [h_target, h_source + e] = a_i . h_target + a_j . h_source + a_j . e
        score_i = (h * c["att_i"]).sum(-1)  # (n, heads)
        score_j = (h * c["att_j"]).sum(-1)
        alpha = F.leaky_relu(score_i[g.dst] + score_j[g.src] + c["score_e"][g.bond],
                             self.negative_slope)
        # softmax over the edges into each atom (torch_geometric.utils.softmax)
        top = torch.segment_reduce(alpha, "max", offsets=g.crow, axis=0)
        alpha = (alpha - top[g.dst]).exp_()
        total = torch.segment_reduce(alpha, "sum", offsets=g.crow, axis=0)
        alpha = (alpha / (total[g.dst] + 1e-16)).t().contiguous()  # (heads, m)
        per_head = h.transpose(0, 1).contiguous()  # (heads, n, d)
        out = None
        for k in range(heads):  # sum_e alpha_e (h_source + e), per head
            y = torch.addmm(g.adjacency(alpha[k]) @ per_head[k], g.bond_matrix(alpha[k]),
                            c["table"][k])
            out = y if out is None else out.add_(y)
        return torch.add(self.bias, out, alpha=1.0 / heads)  # mean over heads + bias


LAYERS = {"gin": GINConv, "gcn": GCNConv, "graphsage": GraphSAGEConv, "gat": GATConv}


class GNN(nn.Module):
    """The pretrain-gnns ``GNN`` (JK = last), inference only (batch norms use running statistics
    whatever the mode). State-dict names as the original.

    Constants derived from the weights (the atom and edge tables, each batch norm as a scale and
    a shift) are computed on first use and dropped by ``load_state_dict`` and ``train``/``eval``;
    call ``eval()`` after changing weights in place.
    """

    def __init__(self, arch: str, num_layer: int, emb_dim: int, *, n_atom_types: int = 120,
                 n_chirality: int = 3, n_bond_types: int = 6, n_directions: int = 3,
                 heads: int = 2):
        super().__init__()
        self.arch, self.num_layer, self.emb_dim = arch, num_layer, emb_dim
        self.n_chirality, self.n_directions = n_chirality, n_directions
        self.n_bond_pairs = n_bond_types * n_directions
        self.x_embedding1 = nn.Embedding(n_atom_types, emb_dim)
        self.x_embedding2 = nn.Embedding(n_chirality, emb_dim)
        extra = {"heads": heads} if arch == "gat" else {}
        self.gnns = nn.ModuleList(
            [LAYERS[arch](emb_dim, n_bond_types, n_directions, **extra) for _ in range(num_layer)])
        self.batch_norms = nn.ModuleList([nn.BatchNorm1d(emb_dim) for _ in range(num_layer)])
        self._constants: tuple | None = None

    def train(self, mode: bool = True) -> "GNN":
        self._constants = None
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._constants = None
        return super().load_state_dict(*args, **kwargs)

    def constants(self) -> tuple:
        if self._constants is None:
            with torch.no_grad():
                e1, e2 = self.x_embedding1.weight, self.x_embedding2.weight
                atoms = (e1[:, None, :] + e2[None, :, :]).reshape(-1, self.emb_dim)
                layers = []
                for conv, norm in zip(self.gnns, self.batch_norms):
                    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                    layers.append((conv.constants(), scale, norm.bias - norm.running_mean * scale))
            self._constants = (atoms, layers)
        return self._constants

    def collate(self, graphs: Sequence[chem.MolGraph]) -> GraphBatch:
        return collate(graphs, self.n_chirality, self.n_directions, self.n_bond_pairs,
                       EDGE_WEIGHTING[self.arch])

    def forward(self, g: GraphBatch) -> Tensor:
        """Atom representations (n, emb_dim)."""
        atoms, layers = self.constants()
        h = atoms[g.atom]  # x_embedding1[atomic] + x_embedding2[chirality]
        last = self.num_layer - 1
        for layer, (conv, (c, scale, shift)) in enumerate(zip(self.gnns, layers)):
            h = torch.addcmul(shift, conv(h, g, c), scale)  # the batch norm
            if layer != last:
                h = h.relu_()
        return h

    def embed(self, g: GraphBatch) -> Tensor:
        """Molecule embeddings (b, emb_dim): the mean of each molecule's atoms."""
        h = self(g)
        if g.sizes.shape[0] == 1:
            return h.mean(0, keepdim=True)
        return torch.segment_reduce(h, "mean", lengths=g.sizes, axis=0)


# --- the encoder a user loads ------------------------------------------------------------------

class Encoder:
    """A loaded checkpoint: SMILES or RDKit molecules -> float32 embeddings (n, dim).

    Molecules are embedded ``batch_size`` at a time (default: the encoder's own, the
    embed_batch_size of the settings it was loaded with),
    cut further into forward passes of at most MAX_BATCH_ATOMS atoms, each one disconnected
    graph; nothing is padded, so sorting by size would gain nothing. The
    embedding of a SMILES depends on how it is written through the chiral tags and bond
    directions the model reads (see icma.retrieval.graph, which embeds canonical forms).
    torch's intra-op threads are set from the settings' torch_threads when the encoder loads;
    on a small machine serving single queries, 1 thread is fastest (benchmarks/results/graph.md).
    """

    def __init__(self, model: GNN, *, name: str, path: Path, sha256: str, batch_size: int,
                 progress: bool):
        self.model = model.eval()
        self.batch_size = batch_size
        self.progress = progress
        self.name = name  # a shipped name, or the checkpoint's absolute path
        self.path = path
        self.sha256 = sha256
        self.arch = model.arch
        self.dim = model.emb_dim
        self.num_layer = model.num_layer

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, arch={self.arch}, layers={self.num_layer}, "
                f"dim={self.dim}, sha256={self.sha256[:12]})")

    def embed_smiles(self, smiles_list: Sequence[str], batch_size: int | None = None,
                     progress: bool | None = None) -> np.ndarray:
        """Embed SMILES as written (a bad one raises InputError naming it: ``smiles[i]``)."""
        if isinstance(smiles_list, str):
            raise InputError("expected a list of SMILES, not one string", field="smiles")

        def mols(lo: int, hi: int) -> list:
            return [chem.parse_smiles(smiles_list[i], field=f"smiles[{i}]") for i in range(lo, hi)]

        return self._embed(len(smiles_list), mols, batch_size, progress)

    def embed_mols(self, mols: Sequence, batch_size: int | None = None,
                   progress: bool | None = None) -> np.ndarray:
        """Embed sanitised RDKit molecules."""
        mols = list(mols)
        for i, m in enumerate(mols):
            if m is None or m.GetNumAtoms() == 0:
                raise InputError("not a molecule (None or no atoms)", field=f"mols[{i}]")
        return self._embed(len(mols), lambda lo, hi: mols[lo:hi], batch_size, progress)

    def embed_graphs(self, graphs: Sequence[chem.MolGraph]) -> np.ndarray:
        """Embed already featurised molecules in one forward pass."""
        if not graphs:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            return self.model.embed(self.model.collate(graphs)).numpy()

    def _embed(self, n: int, mols_of, batch_size, progress) -> np.ndarray:
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        progress = self.progress if progress is None else progress
        out = np.empty((n, self.dim), dtype=np.float32)
        bar = None
        if progress and n >= _PROGRESS_MIN:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=n, desc=f"embedding ({self.name})", unit="mol", leave=False)
        try:
            for lo in range(0, n, batch_size):
                hi = min(n, lo + batch_size)
                graphs = [chem.featurize(m) for m in mols_of(lo, hi)]
                for a, b in _atom_batches(graphs):
                    out[lo + a:lo + b] = self.embed_graphs(graphs[a:b])
                if bar is not None:
                    bar.update(hi - lo)
        finally:
            if bar is not None:
                bar.close()
        return out


def _atom_batches(graphs: Sequence[chem.MolGraph]) -> list[tuple[int, int]]:
    """Consecutive ranges of graphs holding at most MAX_BATCH_ATOMS atoms (or one molecule)."""
    ranges, start, atoms = [], 0, 0
    for i, g in enumerate(graphs):
        n = g.x.shape[0]
        if i > start and atoms + n > MAX_BATCH_ATOMS:
            ranges.append((start, i))
            start, atoms = i, 0
        atoms += n
    ranges.append((start, len(graphs)))
    return ranges


# --- loading -----------------------------------------------------------------------------------

_CACHE: dict[tuple, Encoder] = {}
_CACHE_LOCK = threading.Lock()


def shipped_encoders() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.pth"))


def load_encoder(spec: str | Path | None = None, arch: str | None = None, *,
                 settings: Settings) -> Encoder:
    """Load a checkpoint: a shipped name (``icma/data/encoders/NAME.pth``, or NAME.pth in
    ``<data_dir>/encoders``), a path to a ``.pth``, or None for the settings' encoder (and
    encoder_arch). The settings also give the encoder its batch size and progress default, and
    torch its threads.

    ``arch`` (gin|gcn|gat|graphsage) is needed only for a GCN or GraphSAGE checkpoint whose file
    name says neither: their state dicts have the same keys. Loaded encoders are cached by path,
    file size and modification time (and the batch size and progress default).
    """
    if spec is None:
        spec, arch = settings.encoder, arch or settings.encoder_arch
    if arch is not None:
        arch = arch.strip().lower()
        if arch not in ARCHS:
            raise InputError(f"unknown encoder arch {arch!r}; choose one of {', '.join(ARCHS)}",
                             field="arch")
    path, name = _resolve(spec, settings.data_dir / "encoders")
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}", field="encoder") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns, arch, settings.embed_batch_size,
           settings.progress)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    raw = path.read_bytes()
    state = _read_state_dict(raw, path)
    model = build_model(state, arch=arch, source=path)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    enc = Encoder(model, name=name, path=path, sha256=hashlib.sha256(raw).hexdigest(),
                  batch_size=settings.embed_batch_size, progress=settings.progress)
    with _CACHE_LOCK:
        _CACHE[key] = enc
    return enc


def _resolve(spec: str | Path, user_dir: Path) -> tuple[Path, str]:
    """(checkpoint path, name to record): shipped names stay names, other paths become absolute.
    A name is looked up among the shipped encoders, then in ``user_dir``."""
    text = str(spec).strip()
    if not text:
        raise InputError("empty encoder name", field="encoder")
    looks_like_path = isinstance(spec, Path) or "/" in text or "\\" in text or text.endswith(".pth")
    if not looks_like_path:
        for folder in (SHIPPED_DIR, user_dir):
            candidate = folder / f"{text}.pth"
            if candidate.is_file():
                return candidate.resolve(), text
        raise CheckpointError(
            f"no encoder named {text!r}: shipped encoders are {', '.join(shipped_encoders())}; "
            f"or give a path to a .pth checkpoint", field="encoder")
    path = Path(text).expanduser().resolve()
    if not path.exists() and Path(text).name == text and (SHIPPED_DIR / text).is_file():
        path = (SHIPPED_DIR / text).resolve()  # "NAME.pth" of a shipped encoder
    if not path.exists():
        raise CheckpointError(f"no such checkpoint file: {path}", field="encoder")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}", field="encoder")
    if path.parent == SHIPPED_DIR.resolve():
        return path, path.stem
    return path, str(path)


def _read_state_dict(raw: bytes, path: Path) -> dict[str, Tensor]:
    if not raw:
        raise CheckpointError(f"{path} is empty", field="encoder")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean: not a readable checkpoint
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
            f"{type(exc).__name__}: {why}", field="encoder") from None
    # Some training scripts wrap the weights: {"state_dict": ...} or {"model": ...}.
    if isinstance(obj, Mapping) and "x_embedding1.weight" not in obj:
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor), "
                              f"but a {type(obj).__name__}", field="encoder")
    return dict(obj)


_LAYER_KEY = re.compile(r"^gnns\.(\d+)\.")
_ARCH_WORD = re.compile(r"(?<![a-z])(gin|gcn|gat|graphsage|sage)(?![a-z])")


def build_model(state: Mapping[str, Tensor], arch: str | None = None,
                source: str | Path = "checkpoint") -> GNN:
    """A GNN in eval mode holding ``state``; layers, width and table sizes come from the tensors."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: {problem}", field="encoder")

    # Mole-BERT and fine-tuned pretrain-gnns files hold the GNN under "gnn." beside other heads.
    if any(k.startswith("gnn.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("gnn.")}
    if "x_embedding1.weight" not in state:
        shown = ", ".join(sorted(state)[:6]) or "none"
        raise fail("no 'x_embedding1.weight': not a pretrain-gnns / Mole-BERT GNN checkpoint "
                   f"(keys: {shown}{', ...' if len(state) > 6 else ''})")
    emb1 = state["x_embedding1.weight"]
    if emb1.ndim != 2:
        raise fail(f"x_embedding1.weight has shape {tuple(emb1.shape)}, expected 2 dimensions")
    emb_dim = emb1.shape[1]
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
    if not layers:
        raise fail("no GNN layers (no 'gnns.<l>.' keys)")
    num_layer = layers[-1] + 1
    found = _arch_of_keys(state)
    if found is None:
        shown = ", ".join(sorted(k for k in state if k.startswith("gnns.0."))) or "none"
        raise fail(f"layer type not recognised from its keys ({shown}); "
                   "expected a GIN (mlp), GCN/GraphSAGE (linear) or GAT (att) layer")
    arch = _choose_arch(found, arch, Path(str(source)).stem, fail)

    def rows(key: str, default: int) -> int:
        t = state.get(key)
        return t.shape[0] if t is not None and t.ndim >= 1 else default

    heads = state["gnns.0.att"].shape[1] if arch == "gat" and state["gnns.0.att"].ndim == 3 else 2
    dims = dict(n_atom_types=rows("x_embedding1.weight", 120),
                n_chirality=rows("x_embedding2.weight", 3),
                n_bond_types=rows("gnns.0.edge_embedding1.weight", 6),
                n_directions=rows("gnns.0.edge_embedding2.weight", 3))
    if dims["n_atom_types"] <= chem.ATOM_MASK:
        raise fail(f"x_embedding1 has {dims['n_atom_types']} rows; this featurisation needs "
                   f"{chem.ATOM_MASK + 1} (118 elements + the mask token)")
    if dims["n_bond_types"] <= chem.BOND_SELF_LOOP:
        raise fail(f"edge_embedding1 has {dims['n_bond_types']} rows; it needs at least "
                   f"{chem.BOND_SELF_LOOP + 1} (4 bond types + the self-loop)")
    model = GNN(arch, num_layer, emb_dim, heads=heads, **dims)

    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional, key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise fail(f"does not fit a {num_layer}-layer {arch.upper()} of width {emb_dim}: "
                   + "; ".join(parts))
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise fail(f"shape mismatch for a {num_layer}-layer {arch.upper()} of width {emb_dim}: "
                   + "; ".join(wrong[:5]) + ("; ..." if len(wrong) > 5 else ""))
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise fail(f"non-finite values in {_few(bad)}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise fail(f"cannot load the weights: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _arch_of_keys(state: Mapping[str, Tensor]) -> str | None:
    """'gin', 'gat', 'gcn|graphsage' (the two have the same keys) or None, from layer 0's keys."""
    keys = {k for k in state if k.startswith("gnns.0.")}
    if "gnns.0.mlp.0.weight" in keys:
        return "gin"
    if "gnns.0.att" in keys:
        return "gat"
    if "gnns.0.linear.weight" in keys:
        return "gcn|graphsage"
    return None


def _choose_arch(found: str, arch: str | None, stem: str, fail) -> str:
    describe = {"gin": "a GIN layer (mlp)", "gat": "a GAT layer (att)",
                "gcn|graphsage": "a GCN or GraphSAGE layer (linear)"}[found]
    if arch is not None:
        if arch not in found.split("|"):
            raise fail(f"arch {arch!r} conflicts with the checkpoint, whose keys are those of "
                       f"{describe}")
        return arch
    if found != "gcn|graphsage":
        return found
    words = {"sage": "graphsage"}
    named = {words.get(w, w) for w in _ARCH_WORD.findall(stem.lower())}
    if len(named) == 1:
        (hint,) = named
        if hint in ("gcn", "graphsage"):
            return hint
        raise fail(f"file name says {hint!r} but the keys are those of {describe}; "
                   "pass arch='gcn' or arch='graphsage'")
    raise fail("GCN and GraphSAGE checkpoints have the same keys and the file name says neither; "
               "pass arch='gcn' or arch='graphsage' (setting ICMA_ENCODER_ARCH)")


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
