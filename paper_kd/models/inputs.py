"""The one input every model takes, its checks, and the Minkowski arithmetic.

Every model is called on ``{"p4": [B, N, 4], "mask": [B, N]}``: constituent
``(E, px, py, pz)`` in GeV and a boolean mask of real constituents. Padding may
hold anything; models must read it only through ``mask``.

Two ways to compute Minkowski products, on purpose:

- ``minkowski_dot`` (default) is the plain ``a0 b0 - a.b``, and
  ``stable_mass_squared`` sets the mass of a constituent to exactly zero when
  ``E^2 - p^2`` is within float32 rounding of zero, so trained models never
  learn from rounding noise;
- ``reference_dot`` is the published PyTorch code's float32 formula
  ``2 a0 b0 - (a0 b0 + a1 b1 + a2 b2 + a3 b3)``. Published weights learned the
  rounding noise of that formula (a massless constituent gets a "mass" of a few
  hundredths of a GeV), so only models loading published weights use it.
"""

from keras import ops

__all__ = ["check_inputs", "minkowski_dot", "reference_dot", "stable_mass_squared"]

# |E^2 - p^2| below this fraction of E^2 is float32 rounding (a few ulp of E^2).
_MASSLESS_TOLERANCE = 1e-6


def check_inputs(inputs, model_name):
    """Return ``(p4, mask)`` after checking ranks, the last dimension and finiteness.

    Raises ``ValueError`` (shapes, at trace time) or ``InvalidArgumentError``
    (NaN or infinite momenta, at run time), naming the model and the field.
    """
    if not isinstance(inputs, dict) or "p4" not in inputs or "mask" not in inputs:
        raise ValueError(f"{model_name}: input must be a dict with keys 'p4' and 'mask'")
    p4, mask = inputs["p4"], inputs["mask"]
    if len(p4.shape) != 3 or p4.shape[-1] != 4:
        raise ValueError(f"{model_name}: 'p4' must be [batch, node, 4], got shape {p4.shape}")
    if len(mask.shape) != 2:
        raise ValueError(f"{model_name}: 'mask' must be [batch, node], got shape {mask.shape}")
    for axis in (0, 1):
        if None not in (p4.shape[axis], mask.shape[axis]) and p4.shape[axis] != mask.shape[axis]:
            raise ValueError(
                f"{model_name}: 'mask' shape {mask.shape} does not match 'p4' shape {p4.shape}"
            )

    import tensorflow as tf

    p4 = tf.debugging.check_numerics(
        ops.convert_to_tensor(p4), f"{model_name}: 'p4' holds NaN or infinite momenta"
    )
    return p4, ops.cast(mask, "bool")


def minkowski_dot(a, b):
    """``a0 b0 - a.b`` on the last axis."""
    return a[..., 0] * b[..., 0] - ops.sum(a[..., 1:] * b[..., 1:], axis=-1)


def reference_dot(a, b):
    """The published float32 formula ``2 a0 b0 - sum_i a_i b_i`` (rounding included)."""
    return 2.0 * a[..., 0] * b[..., 0] - ops.sum(a * b, axis=-1)


def stable_mass_squared(p4):
    """``E^2 - p^2`` with float32 rounding of massless constituents set to exactly zero."""
    energy_squared = p4[..., 0] * p4[..., 0]
    mass_squared = energy_squared - ops.sum(p4[..., 1:] * p4[..., 1:], axis=-1)
    negligible = ops.abs(mass_squared) <= _MASSLESS_TOLERANCE * energy_squared
    return ops.where(negligible, ops.zeros_like(mass_squared), mass_squared)
