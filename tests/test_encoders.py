"""The pretrain-gnns / Mole-BERT GNN family: loading, the math, invariances, checkpoint errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rdkit import Chem
from torch_geometric.utils import softmax as pyg_softmax

from icma.core import chem
from icma.retrieval.encoders import DENSE_MAX_ATOMS, MAX_BATCH_ATOMS, load_encoder
from icma.core.errors import CheckpointError, InputError
from icma.core.settings import get_settings

CHECKPOINTS = {  # file -> arch
    "gcn_contextpred.pth": "gcn",
    "gcn_supervised_contextpred.pth": "gcn",
    "graphsage_contextpred.pth": "graphsage",
    "gat_contextpred.pth": "gat",
}

MOLECULES = [
    "CCO",
    "C[C@H](N)C(=O)O",  # tetrahedral stereo
    "C/C=C/C(=O)[O-]",  # bond directions
    "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O",
    "c1ccc2ccccc2c1",
    "C#N",
    "[Na+].[Cl-]",  # two fragments, no bonds
    "C[C@]12CCC(=O)C=C1CC[C@@H]3[C@@H]2C(=O)C[C@]\\4([C@H]3CC/C4=C/C(=O)OC)C",  # ChEBI-20 test
]


@pytest.fixture(scope="module")
def encoders(pretrain_gnns):
    return {name: load_encoder(pretrain_gnns / name, settings=get_settings())
            for name in CHECKPOINTS}


# --- an independent, literal per-edge port of pretrain-gnns chem/model.py (float64) ------------

def reference_embed(state: dict, arch: str, mol: Chem.Mol) -> np.ndarray:
    """One molecule, edge by edge, as the original code computes it (old torch_geometric
    convention: x_i = x[edge_index[0]] is the target, x_j = x[edge_index[1]] the source)."""
    sd = {k[4:] if k.startswith("gnn.") else k: v.double() for k, v in state.items()
          if v.is_floating_point() and not k.startswith("graph_pred")}
    g = chem.featurize(mol)
    x = torch.from_numpy(g.x)
    n = x.shape[0]
    chirality = x[:, 1].clone()
    chirality[chirality == 3] = 0  # CHI_OTHER has no row of its own
    h = sd["x_embedding1.weight"][x[:, 0]] + sd["x_embedding2.weight"][chirality]
    loops = torch.arange(n)
    edge_index = torch.cat([torch.from_numpy(g.edge_index), torch.stack([loops, loops])], dim=1)
    edge_attr = torch.cat([torch.from_numpy(g.edge_attr), torch.tensor([[4, 0]]).repeat(n, 1)])
    row, col = edge_index
    num_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("gnns."))
    d = h.shape[1]
    for layer in range(num_layer):
        p = f"gnns.{layer}."
        e = sd[p + "edge_embedding1.weight"][edge_attr[:, 0]] + \
            sd[p + "edge_embedding2.weight"][edge_attr[:, 1]]
        if arch == "gin":
            agg = torch.zeros(n, d, dtype=torch.float64).index_add_(0, row, h[col] + e)
            hidden = F.relu(F.linear(agg, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
            out = F.linear(hidden, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
        elif arch in ("gcn", "graphsage"):
            hl = F.linear(h, sd[p + "linear.weight"], sd[p + "linear.bias"])
            deg = torch.zeros(n, dtype=torch.float64).index_add_(
                0, row, torch.ones(len(row), dtype=torch.float64))
            if arch == "gcn":
                norm = deg.pow(-0.5)[row] * deg.pow(-0.5)[col]
                out = torch.zeros(n, d, dtype=torch.float64).index_add_(
                    0, row, norm[:, None] * (hl[col] + e))
            else:
                total = torch.zeros(n, d, dtype=torch.float64).index_add_(0, row, hl[col] + e)
                out = F.normalize(total / deg[:, None], p=2, dim=-1)
        elif arch == "gat":
            heads = sd[p + "att"].shape[1]
            hl = F.linear(h, sd[p + "weight_linear.weight"], sd[p + "weight_linear.bias"])
            hl = hl.view(-1, heads, d)
            x_j = hl[col] + e.view(-1, heads, d)
            x_i = hl[row]
            alpha = F.leaky_relu((torch.cat([x_i, x_j], dim=-1) * sd[p + "att"]).sum(-1), 0.2)
            alpha = pyg_softmax(alpha, row, num_nodes=n)
            out = torch.zeros(n, heads, d, dtype=torch.float64).index_add_(
                0, row, x_j * alpha[..., None])
            out = out.mean(dim=1) + sd[p + "bias"]
        else:
            raise AssertionError(arch)
        bn = f"batch_norms.{layer}."
        h = (out - sd[bn + "running_mean"]) / torch.sqrt(sd[bn + "running_var"] + 1e-5) * \
            sd[bn + "weight"] + sd[bn + "bias"]
        if layer != num_layer - 1:
            h = F.relu(h)
    return h.mean(dim=0).numpy()


def random_gin_state(emb_dim: int = 300, num_layer: int = 5, seed: int = 0) -> dict:
    """A Mole-BERT-shaped GIN state dict, written out key by key."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    d = emb_dim
    sd = {"x_embedding1.weight": rnd(120, d), "x_embedding2.weight": rnd(3, d)}
    for layer in range(num_layer):
        p = f"gnns.{layer}."
        sd.update({
            p + "mlp.0.weight": rnd(2 * d, d, scale=d ** -0.5), p + "mlp.0.bias": rnd(2 * d),
            p + "mlp.2.weight": rnd(d, 2 * d, scale=(2 * d) ** -0.5), p + "mlp.2.bias": rnd(d),
            p + "edge_embedding1.weight": rnd(6, d), p + "edge_embedding2.weight": rnd(3, d),
        })
        bn = f"batch_norms.{layer}."
        sd.update({bn + "weight": 1 + rnd(d, scale=0.1), bn + "bias": rnd(d, scale=0.1),
                   bn + "running_mean": rnd(d),
                   bn + "running_var": 1 + torch.rand(d, generator=gen) * 4,
                   bn + "num_batches_tracked": torch.tensor(100)})
    return sd


def assert_close_to(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4):
    """Equal to within rtol of the vector's largest value (float32 rounding is relative: the
    gcn_contextpred embeddings reach magnitudes near 100)."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def assert_same_embedding(a: np.ndarray, b: np.ndarray, tol: float = 1e-5):
    """Within tol relative to the largest value, and within tol once L2-normalised (cosine
    retrieval compares only directions)."""
    assert_close_to(a, b, rtol=tol)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(a), unit(b), rtol=0, atol=tol)


# --- loading the real checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_loads_and_embeds(encoders, name):
    enc = encoders[name]
    assert enc.arch == CHECKPOINTS[name]
    assert (enc.dim, enc.num_layer) == (300, 5)
    assert len(enc.sha256) == 64
    out = enc.embed_smiles(MOLECULES)
    assert out.shape == (len(MOLECULES), 300) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.abs(out).max() > 0


def test_default_encoder_is_shipped():
    enc = load_encoder(settings=get_settings())
    assert enc.name == "gcn_supervised_contextpred" and enc.arch == "gcn" and enc.dim == 300
    assert enc is load_encoder("gcn_supervised_contextpred", settings=get_settings())  # cached


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_matches_the_per_edge_reference(encoders, pretrain_gnns, name):
    state = torch.load(pretrain_gnns / name, map_location="cpu", weights_only=True)
    out = encoders[name].embed_smiles(MOLECULES, batch_size=3)  # batches of several molecules
    for i, smi in enumerate(MOLECULES):
        assert_close_to(out[i], reference_embed(state, CHECKPOINTS[name], chem.parse_smiles(smi)))


def test_batching_does_not_change_embeddings(encoders):
    enc = encoders["gat_contextpred.pth"]
    # one batch of more than DENSE_MAX_ATOMS atoms (sparse adjacency) against one molecule at a
    # time (dense adjacency)
    assert sum(chem.parse_smiles(s).GetNumAtoms() for s in MOLECULES) > DENSE_MAX_ATOMS
    together = enc.embed_smiles(MOLECULES, batch_size=256)
    alone = np.vstack([enc.embed_smiles([s]) for s in MOLECULES])
    for a, b in zip(together, alone):
        assert_same_embedding(a, b)
    # more atoms than one forward pass takes: cut into several passes, rows kept in order
    many = MOLECULES * 40
    assert sum(chem.parse_smiles(s).GetNumAtoms() for s in many) > 2 * MAX_BATCH_ATOMS
    for a, b in zip(enc.embed_smiles(many, batch_size=100), np.tile(alone, (40, 1))):
        assert_same_embedding(a, b)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_atom_order_does_not_matter(encoders, name):
    rng = np.random.default_rng(7)
    enc = encoders[name]
    for smi in MOLECULES:
        mol = chem.parse_smiles(smi)
        perm = rng.permutation(mol.GetNumAtoms()).tolist()
        other = Chem.RenumberAtoms(mol, perm)
        assert Chem.MolToSmiles(other) == Chem.MolToSmiles(mol)
        # the same graph: the same chiral tags and bond directions on the same atoms and bonds
        assert [other.GetAtomWithIdx(i).GetChiralTag() for i in range(len(perm))] == \
            [mol.GetAtomWithIdx(j).GetChiralTag() for j in perm]
        a, b = enc.embed_mols([mol, other])
        assert_same_embedding(a, b)


def test_chi_other_reads_as_unspecified(encoders):
    enc = encoders["gcn_supervised_contextpred.pth"]
    mol = chem.parse_smiles("CC(N)(O)C(=O)O")
    other = Chem.Mol(mol)
    other.GetAtomWithIdx(1).SetChiralTag(Chem.ChiralType.CHI_OTHER)
    assert chem.featurize(other).x[1, 1] == 3
    a, b = enc.embed_mols([mol, other])
    np.testing.assert_array_equal(a, b)


def test_prefixed_checkpoint_loads_the_same(encoders, pretrain_gnns, tmp_path):
    state = torch.load(pretrain_gnns / "gat_contextpred.pth", map_location="cpu",
                       weights_only=True)
    wrapped = {f"gnn.{k}": v for k, v in state.items()}
    wrapped["graph_pred_linear.weight"] = torch.randn(1, 300)
    wrapped["graph_pred_linear.bias"] = torch.randn(1)
    path = tmp_path / "finetuned_gat.pth"
    torch.save(wrapped, path)
    enc = load_encoder(path, settings=get_settings())
    assert enc.arch == "gat" and enc.name == str(path.resolve())
    np.testing.assert_array_equal(enc.embed_smiles(MOLECULES),
                                  encoders["gat_contextpred.pth"].embed_smiles(MOLECULES))


def test_random_mole_bert_shaped_gin(tmp_path):
    state = random_gin_state()
    path = tmp_path / "Mole-BERT.pth"  # no arch in the name: GIN is told by its mlp keys
    torch.save({f"gnn.{k}": v for k, v in state.items()}, path)
    enc = load_encoder(path, settings=get_settings())
    assert (enc.arch, enc.num_layer, enc.dim) == ("gin", 5, 300)
    out = enc.embed_smiles(MOLECULES, batch_size=4)
    assert np.isfinite(out).all()
    for i, smi in enumerate(MOLECULES):
        assert_close_to(out[i], reference_embed(state, "gin", chem.parse_smiles(smi)))


def test_layers_and_width_come_from_the_state_dict(tmp_path):
    state = random_gin_state(emb_dim=16, num_layer=2, seed=3)
    path = tmp_path / "small_gin.pth"
    torch.save(state, path)
    enc = load_encoder(path, settings=get_settings())
    assert (enc.num_layer, enc.dim) == (2, 16)
    assert_close_to(enc.embed_smiles(["CC(=O)O"])[0],
                    reference_embed(state, "gin", chem.parse_smiles("CC(=O)O")))


# --- the math, by hand -------------------------------------------------------------------------

def _one_layer_state(arch: str, d: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = {"x_embedding1.weight": rng.normal(size=(120, d)),
         "x_embedding2.weight": rng.normal(size=(3, d)),
         "gnns.0.edge_embedding1.weight": rng.normal(size=(6, d)),
         "gnns.0.edge_embedding2.weight": rng.normal(size=(3, d)),
         "batch_norms.0.weight": rng.normal(size=d), "batch_norms.0.bias": rng.normal(size=d),
         "batch_norms.0.running_mean": rng.normal(size=d),
         "batch_norms.0.running_var": rng.uniform(0.5, 2, size=d)}
    if arch == "gcn":
        s["gnns.0.linear.weight"] = rng.normal(size=(d, d))
        s["gnns.0.linear.bias"] = rng.normal(size=d)
    else:
        s["gnns.0.mlp.0.weight"] = rng.normal(size=(2 * d, d))
        s["gnns.0.mlp.0.bias"] = rng.normal(size=2 * d)
        s["gnns.0.mlp.2.weight"] = rng.normal(size=(d, 2 * d))
        s["gnns.0.mlp.2.bias"] = rng.normal(size=d)
    return s


@pytest.mark.parametrize("arch", ["gcn", "gin"])
def test_formaldehyde_by_hand(arch, tmp_path):
    """C=O through one layer, computed with numpy from the formulas."""
    s = _one_layer_state(arch)
    path = tmp_path / f"tiny_{arch}.pth"
    torch.save({k: torch.tensor(v, dtype=torch.float32) for k, v in s.items()}, path)
    got = load_encoder(path, settings=get_settings()).embed_smiles(["C=O"])[0]

    w = {k: v.astype(np.float32).astype(np.float64) for k, v in s.items()}  # the stored values
    atoms = [w["x_embedding1.weight"][5] + w["x_embedding2.weight"][0],  # carbon: Z 6 -> row 5
             w["x_embedding1.weight"][7] + w["x_embedding2.weight"][0]]  # oxygen: Z 8 -> row 7
    e_double = w["gnns.0.edge_embedding1.weight"][1] + w["gnns.0.edge_embedding2.weight"][0]
    e_self = w["gnns.0.edge_embedding1.weight"][4] + w["gnns.0.edge_embedding2.weight"][0]
    out = []
    for i, j in ((0, 1), (1, 0)):  # each atom receives its self-loop and the double bond
        if arch == "gcn":
            lin = [w["gnns.0.linear.weight"] @ a + w["gnns.0.linear.bias"] for a in atoms]
            # both atoms have degree 2 (the bond and the self-loop): every norm is 1/2
            out.append(0.5 * (lin[i] + e_self) + 0.5 * (lin[j] + e_double))
        else:
            agg = (atoms[i] + e_self) + (atoms[j] + e_double)
            hidden = np.maximum(w["gnns.0.mlp.0.weight"] @ agg + w["gnns.0.mlp.0.bias"], 0)
            out.append(w["gnns.0.mlp.2.weight"] @ hidden + w["gnns.0.mlp.2.bias"])
    out = np.array(out)
    out = (out - w["batch_norms.0.running_mean"]) / np.sqrt(w["batch_norms.0.running_var"] + 1e-5)
    out = out * w["batch_norms.0.weight"] + w["batch_norms.0.bias"]  # last layer: no ReLU
    np.testing.assert_allclose(got, out.mean(axis=0), rtol=1e-5, atol=1e-5)


# --- inputs and checkpoint errors --------------------------------------------------------------

def test_bad_smiles_is_named(encoders):
    enc = encoders["gcn_contextpred.pth"]
    with pytest.raises(InputError, match=r"smiles\[1\].*C1CC"):
        enc.embed_smiles(["CCO", "C1CC"])
    with pytest.raises(InputError):
        enc.embed_smiles("CCO")
    assert enc.embed_smiles([]).shape == (0, 300)


def _save(state: dict, path):
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def gcn_state(pretrain_gnns):
    return torch.load(pretrain_gnns / "gcn_contextpred.pth", map_location="cpu", weights_only=True)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_encoder(tmp_path / "nope_gcn.pth", settings=get_settings())
    with pytest.raises(CheckpointError, match="gcn_supervised_contextpred"):
        load_encoder("no_such_encoder", settings=get_settings())
    with pytest.raises(InputError, match="unknown encoder arch"):
        load_encoder("gcn_supervised_contextpred", arch="transformer", settings=get_settings())


def test_corrupt_file(tmp_path):
    path = tmp_path / "random_gcn.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        load_encoder(path, settings=get_settings())
    assert str(path) in str(err.value)
    empty = tmp_path / "empty_gcn.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_encoder(empty, settings=get_settings())


def test_truncated_file(pretrain_gnns, tmp_path):
    raw = (pretrain_gnns / "gcn_contextpred.pth").read_bytes()
    path = tmp_path / "truncated_gcn.pth"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_encoder(path, settings=get_settings())
    assert str(path) in str(err.value)


def test_wrong_shape(gcn_state, tmp_path):
    state = dict(gcn_state)
    state["gnns.2.linear.weight"] = torch.zeros(300, 200)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch.*gnns\.2\.linear\.weight is \(300, 200\)"):
        load_encoder(_save(state, tmp_path / "wrong_gcn.pth"), settings=get_settings())


def test_missing_and_unexpected_keys(gcn_state, tmp_path):
    state = dict(gcn_state)
    del state["batch_norms.4.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys batch_norms\.4\.running_var"):
        load_encoder(_save(state, tmp_path / "missing_gcn.pth"), settings=get_settings())
    state = dict(gcn_state)
    state["gnns.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys gnns\.1\.extra\.weight"):
        load_encoder(_save(state, tmp_path / "extra_gcn.pth"), settings=get_settings())
    with pytest.raises(CheckpointError, match="not a pretrain-gnns"):
        load_encoder(_save({"weight": torch.zeros(3)}, tmp_path / "other_gcn.pth"),
                     settings=get_settings())
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_encoder(_save([1, 2, 3], tmp_path / "list_gcn.pth"), settings=get_settings())


def test_gcn_or_graphsage_needs_a_name_or_arch(pretrain_gnns, tmp_path):
    path = tmp_path / "encoder.pth"
    shutil.copy(pretrain_gnns / "graphsage_contextpred.pth", path)
    with pytest.raises(CheckpointError, match="arch='gcn' or arch='graphsage'") as err:
        load_encoder(path, settings=get_settings())
    assert str(path) in str(err.value)
    enc = load_encoder(path, arch="graphsage", settings=get_settings())
    assert enc.arch == "graphsage"
    reference = load_encoder(pretrain_gnns / "graphsage_contextpred.pth", settings=get_settings())
    np.testing.assert_array_equal(enc.embed_smiles(MOLECULES[:3]),
                                  reference.embed_smiles(MOLECULES[:3]))
    with pytest.raises(CheckpointError, match="conflicts"):
        load_encoder(path, arch="gin", settings=get_settings())
    misnamed = tmp_path / "my_gat.pth"
    shutil.copy(pretrain_gnns / "gcn_contextpred.pth", misnamed)
    with pytest.raises(CheckpointError, match="file name says 'gat'"):
        load_encoder(misnamed, settings=get_settings())
