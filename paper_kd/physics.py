"""Relativistic kinematics of jets and their constituents.

Conventions used across the package:

- a four-momentum is ``(E, px, py, pz)`` in GeV on the last axis;
- the metric is ``(+, -, -, -)``;
- ``eta`` is the pseudorapidity ``asinh(pz / pt)``, ``y`` the rapidity;
- ``phi`` is the azimuth in ``[-pi, pi)``;
- zero four-vectors are padding: every function maps them to finite values and
  every boost maps them to zero, so padded arrays need no mask here.

A boost is *active*: ``boost(p4, beta, "x")`` gives each particle an extra
velocity ``beta`` along ``+x``. Two collinear boosts compose by relativistic
velocity addition, ``(b1 + b2) / (1 + b1 b2)``.

The numpy functions take and return numpy arrays; ``boost_tensor`` is the same
boost written with ``keras.ops`` for use inside models and ``tf.data``.
"""

import numpy as np

__all__ = [
    "AXES",
    "boost",
    "boost_tensor",
    "delta_phi",
    "eta",
    "jet_p4",
    "mass",
    "minkowski_dot",
    "phi",
    "pt",
    "rapidity",
]

AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}

# Smallest transverse momentum (GeV) used in a division; keeps eta finite for
# particles along the beam and for padding.
_PT_FLOOR = 1e-12


def minkowski_dot(a, b):
    """Minkowski product ``a0 b0 - a.b`` of four-vectors on the last axis."""
    return a[..., 0] * b[..., 0] - np.sum(a[..., 1:] * b[..., 1:], axis=-1)


def mass(p4):
    """Invariant mass ``sqrt(max(E^2 - p^2, 0))``."""
    return np.sqrt(np.maximum(minkowski_dot(p4, p4), 0.0))


def pt(p4):
    """Transverse momentum ``sqrt(px^2 + py^2)``."""
    return np.hypot(p4[..., 1], p4[..., 2])


def eta(p4):
    """Pseudorapidity ``asinh(pz / pt)``; finite along the beam and for padding."""
    return np.arcsinh(p4[..., 3] / np.maximum(pt(p4), _PT_FLOOR))


def rapidity(p4):
    """Rapidity ``0.5 log((E + pz) / (E - pz))``; zero for padding."""
    energy, pz = p4[..., 0], p4[..., 3]
    plus = np.maximum(energy + pz, _PT_FLOOR)
    minus = np.maximum(energy - pz, _PT_FLOOR)
    return np.where(energy > 0, 0.5 * np.log(plus / minus), 0.0)


def phi(p4):
    """Azimuth in ``[-pi, pi)``."""
    return delta_phi(np.arctan2(p4[..., 2], p4[..., 1]), 0.0)


def delta_phi(phi_a, phi_b):
    """Azimuthal difference ``phi_a - phi_b`` wrapped to ``[-pi, pi)``."""
    return np.mod(np.asarray(phi_a) - phi_b + np.pi, 2 * np.pi) - np.pi


def jet_p4(p4):
    """Jet four-momentum: the sum over constituents (axis -2); padding adds zero."""
    return np.sum(p4, axis=-2)


def _unit_direction(direction, dtype):
    if isinstance(direction, str):
        if direction not in AXES:
            raise ValueError(f"boost direction must be one of {sorted(AXES)}, got {direction!r}")
        return np.asarray(AXES[direction], dtype=dtype)
    direction = np.asarray(direction, dtype=dtype)
    if direction.shape[-1:] != (3,):
        raise ValueError(f"a boost direction needs 3 components, got shape {direction.shape}")
    norm = np.linalg.norm(direction, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError("a boost direction must be a non-zero vector")
    return direction / norm


def boost(p4, beta, direction="x"):
    """Lorentz-boost four-momenta by velocity ``beta`` along ``direction``.

    Args:
        p4: array ``[..., 4]`` of ``(E, px, py, pz)``.
        beta: velocity in units of c, ``|beta| < 1``; a scalar or an array that
            broadcasts against ``p4.shape[:-1]`` (one value per jet: ``[B, 1]``).
        direction: ``"x"``, ``"y"``, ``"z"``, or vectors ``[..., 3]`` that
            broadcast against ``p4[..., 1:]`` (one axis per jet: ``[B, 1, 3]``).

    Returns:
        The boosted four-momenta, same shape and dtype as ``p4``.

    Example:
        >>> boost(np.array([1.0, 0.0, 0.0, 0.0]), 0.6)  # a particle at rest
        array([1.25, 0.75, 0.  , 0.  ])
    """
    p4 = np.asarray(p4)
    dtype = p4.dtype if np.issubdtype(p4.dtype, np.floating) else np.float64
    p4 = p4.astype(dtype, copy=False)
    beta = np.asarray(beta, dtype=dtype)
    if np.any(np.abs(beta) >= 1):
        raise ValueError(f"boost velocity must satisfy |beta| < 1, got max {np.abs(beta).max()}")
    unit = _unit_direction(direction, dtype)

    gamma = 1.0 / np.sqrt(1.0 - beta * beta)
    energy, momentum = p4[..., 0], p4[..., 1:]
    p_parallel = np.sum(momentum * unit, axis=-1)

    new_energy = gamma * (energy + beta * p_parallel)
    shift = (gamma - 1.0) * p_parallel + gamma * beta * energy
    new_momentum = momentum + shift[..., None] * unit
    return np.concatenate([new_energy[..., None], new_momentum], axis=-1).astype(dtype)


def boost_tensor(p4, beta, direction="x"):
    """``boost`` for tensors, written with ``keras.ops`` (differentiable, graph-safe).

    ``beta`` must already satisfy ``|beta| < 1``; it is not checked inside a graph.
    """
    from keras import ops

    p4 = ops.convert_to_tensor(p4)
    beta = ops.cast(ops.convert_to_tensor(beta), p4.dtype)
    if isinstance(direction, str):
        unit = ops.convert_to_tensor(_unit_direction(direction, np.float64), dtype=p4.dtype)
    else:
        direction = ops.cast(ops.convert_to_tensor(direction), p4.dtype)
        unit = direction / ops.norm(direction, axis=-1, keepdims=True)

    gamma = 1.0 / ops.sqrt(1.0 - beta * beta)
    energy, momentum = p4[..., 0], p4[..., 1:]
    p_parallel = ops.sum(momentum * unit, axis=-1)

    new_energy = gamma * (energy + beta * p_parallel)
    shift = (gamma - 1.0) * p_parallel + gamma * beta * energy
    new_momentum = momentum + ops.expand_dims(shift, -1) * unit
    return ops.concatenate([ops.expand_dims(new_energy, -1), new_momentum], axis=-1)
