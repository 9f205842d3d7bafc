import numpy as np
import pytest

from paper_kd import physics


def random_jets(rng, n_jets=8, n_particles=20, massive=True):
    momentum = rng.normal(0, 50, size=(n_jets, n_particles, 3))
    masses = rng.uniform(0, 5, size=(n_jets, n_particles)) if massive else 0.0
    energy = np.sqrt(np.sum(momentum**2, axis=-1) + masses**2)
    return np.concatenate([energy[..., None], momentum], axis=-1)


def test_zero_boost_is_identity():
    p4 = random_jets(np.random.default_rng(0))
    np.testing.assert_allclose(physics.boost(p4, 0.0, "x"), p4, rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction", ["x", "y", "z", [0.3, -0.2, 0.9]])
def test_boost_preserves_invariant_masses(direction):
    p4 = random_jets(np.random.default_rng(1))
    boosted = physics.boost(p4, 0.9, direction)
    np.testing.assert_allclose(
        physics.minkowski_dot(boosted, boosted), physics.minkowski_dot(p4, p4), rtol=1e-9, atol=1e-6
    )
    pair = physics.minkowski_dot(boosted[:, :1], boosted[:, 1:])
    np.testing.assert_allclose(pair, physics.minkowski_dot(p4[:, :1], p4[:, 1:]), rtol=1e-9)


def test_collinear_boosts_compose_by_velocity_addition():
    p4 = random_jets(np.random.default_rng(2))
    b1, b2 = 0.6, 0.7
    twice = physics.boost(physics.boost(p4, b1, "z"), b2, "z")
    once = physics.boost(p4, (b1 + b2) / (1 + b1 * b2), "z")
    np.testing.assert_allclose(twice, once, rtol=1e-10, atol=1e-9)


def test_boost_moves_particle_at_rest_along_axis():
    at_rest = np.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(physics.boost(at_rest, 0.6, "x"), [1.25, 0.75, 0.0, 0.0])


def test_boost_keeps_padding_zero_and_per_jet_parameters():
    p4 = random_jets(np.random.default_rng(3))
    p4[:, -5:] = 0.0
    beta = np.linspace(0.1, 0.9, len(p4))[:, None]
    axis = physics.jet_p4(p4)[:, None, 1:]
    boosted = physics.boost(p4, beta, axis)
    assert np.all(boosted[:, -5:] == 0.0)
    jet_mass = physics.mass(physics.jet_p4(p4))
    np.testing.assert_allclose(physics.mass(physics.jet_p4(boosted)), jet_mass, rtol=1e-9)


def test_boost_tensor_matches_numpy():
    p4 = random_jets(np.random.default_rng(4)).astype(np.float32)
    beta = np.full((len(p4), 1), 0.8, np.float32)
    expected = physics.boost(p4.astype(np.float64), beta, "x")
    np.testing.assert_allclose(np.asarray(physics.boost_tensor(p4, beta, "x")), expected, rtol=1e-5)


def test_boost_rejects_superluminal_velocity_and_bad_axis():
    p4 = random_jets(np.random.default_rng(5))
    with pytest.raises(ValueError, match="beta"):
        physics.boost(p4, 1.0)
    with pytest.raises(ValueError, match="direction"):
        physics.boost(p4, 0.5, "w")


def test_kinematics_are_finite_on_padding_and_beam_particles():
    p4 = np.array([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 10.0], [5.0, 3.0, 4.0, 0.0]])
    assert np.all(np.isfinite(physics.eta(p4)))
    assert np.all(np.isfinite(physics.rapidity(p4)))
    np.testing.assert_allclose(physics.pt(p4), [0.0, 0.0, 5.0])
    np.testing.assert_allclose(physics.eta(p4)[2], 0.0)
    assert -np.pi <= physics.phi(p4)[2] < np.pi


def test_delta_phi_wraps():
    np.testing.assert_allclose(physics.delta_phi(3.0, -3.0), 6.0 - 2 * np.pi)
    np.testing.assert_allclose(physics.delta_phi(-np.pi, 0.0), -np.pi)
