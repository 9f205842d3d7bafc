"""Parameter and MAC counts, checked against counts done by hand for small models."""

import pytest

from paper_kd.models.size import model_size, size_table
from paper_kd.models.students import MLP, DeepSet, EnergyFlowNetwork, ParticleFlowNetwork


def test_deepset_small_by_hand():
    # phi 4 -> 8 -> 8 on 5 constituents, weighted sum of 5 x 8, then phi's last Linear
    # 8 -> 4 once per jet (it commutes with the sum), rho 4 -> 8 -> 8 -> 2.
    size = model_size(DeepSet(width=8, latent=4, depth=3), n_constituents=5)
    assert size["macs_per_jet"] == 5 * (32 + 64) + 5 * 8 + 32 + (32 + 64 + 16)
    # Dense 40 + 72 + 36 in phi and 40 + 72 + 18 in rho; BatchNorm scale and offset:
    # 2 x 8 twice in phi, 2 x 4 + 2 x 8 twice in rho. Running statistics excluded.
    assert size["parameters"] == (40 + 72 + 36) + (40 + 72 + 18) + 16 * 2 + 8 + 16 * 2
    assert size == {"parameters": 350, "macs_per_jet": 664}


def test_published_deepset():
    size = model_size(DeepSet(), n_constituents=57)
    assert size["parameters"] == 68226
    per_constituent = 4 * 128 + 128 * 128 + 128  # two Linear layers and the pooling sum
    assert size["macs_per_jet"] == 57 * per_constituent + 3 * 128 * 128 + 256


def test_mlp_small_by_hand_does_not_depend_on_multiplicity():
    model = MLP(n_constituents=3, width=5, depth=2)
    # 12 inputs -> 5 -> 2: MACs 60 + 10; parameters 65 + BatchNorm 10 + 12.
    assert model_size(model, n_constituents=2) == {"parameters": 87, "macs_per_jet": 70}
    assert model_size(model, n_constituents=50) == {"parameters": 87, "macs_per_jet": 70}


def test_flow_networks_small_by_hand():
    pfn = ParticleFlowNetwork(phi_sizes=(3, 2), f_sizes=(4,))
    # Phi 4 -> 3 -> 2 on 5 constituents, sum of 5 x 2, F 2 -> 4 -> 2.
    assert model_size(pfn, n_constituents=5) == {
        "parameters": 15 + 8 + 12 + 10,
        "macs_per_jet": 5 * (12 + 6) + 10 + (8 + 8),
    }
    efn = EnergyFlowNetwork(phi_sizes=(3, 2), f_sizes=(4,))
    # Phi sees only the two angles: 2 -> 3 -> 2.
    assert model_size(efn, n_constituents=5) == {
        "parameters": 9 + 8 + 12 + 10,
        "macs_per_jet": 5 * (6 + 6) + 10 + (8 + 8),
    }


def test_lorentznet_small_by_hand():
    lorentznet = pytest.importorskip("paper_kd.models.lorentznet", reason="LorentzNet not built")
    model = lorentznet.LorentzNet(n_hidden=4, n_layers=2, n_scalar=2, n_classes=2)
    # 3 constituents + 2 beams = 5 nodes, 20 edges, hidden 4.
    # Embedding 5 x 2 x 4 = 40. Per edge: phi_e's first Linear on the two invariants
    # 2 x 4, its second 4 x 4, phi_m 4 -> 28; phi_x 4 x 4 + 4 = 20 except in the last
    # block. Per node: phi_e's first Linear on h_i and h_j 2 x 4 x 4 = 32, phi_h
    # 10 x 4 + 4 x 4 = 56. Decoder 4 x 4 + 4 x 2 = 24.
    macs = 40 + (20 * 48 + 5 * 88) + (20 * 28 + 5 * 88) + 24
    # Embedding 12; block: phi_e 40 + BN 8 + 20, phi_m 5, phi_x 20 + 4, phi_h 44 + BN 8 + 20;
    # no phi_x in the last block; decoder 20 + 10.
    parameters = 12 + (68 + 5 + 24 + 72) + (68 + 5 + 72) + 30
    assert model_size(model, n_constituents=3) == {
        "parameters": parameters,
        "macs_per_jet": macs,
    }
    assert macs == 2464 and parameters == 356


def test_size_table_rows_and_bad_multiplicity():
    rows = size_table({"deepset": DeepSet(width=8, latent=4, depth=3)}, n_constituents=5)
    assert rows == [
        {"model": "deepset", "parameters": 350, "macs_per_jet": 664, "n_constituents": 5}
    ]
    with pytest.raises(ValueError, match="n_constituents must be >= 1"):
        model_size(DeepSet(), n_constituents=0)
