"""Student taggers: the paper's Deep Set and MLP, and the Particle/Energy Flow Networks.

- ``DeepSet``: the student of Liu et al. (arXiv:2311.14160), a Particle Flow
  Network whose pooling is the sum of ``phi`` weighted by each constituent's
  pT fraction (an Energy-Flow-style sum over full per-constituent features).
- ``ParticleFlowNetwork`` and ``EnergyFlowNetwork``: Komiske, Metodiev and
  Thaler, JHEP 01 (2019) 121 (arXiv:1810.05165), on the same four features.
- ``MLP``: the paper's fully connected student on the leading 128 constituents
  times four features, flattened.

Every model takes ``{"p4": [B, N, 4], "mask": [B, N]}`` and computes its
per-constituent features inside (``ConstituentFeatures``), so a boosted batch
can be fed directly. The features are, per constituent ``i`` of a jet whose
four-momentum is the sum of its real constituents:

    (pT_i / pT_jet, eta_i - eta_jet, phi_i - phi_jet wrapped to [-pi, pi), m_i)

with pseudorapidity ``eta``. ``arithmetic="reference"`` reproduces the
published PyTorch float32 formulas (``eta = atanh(pz / |p|)``; the mass of a
constituent is ``sqrt(|2 E^2 - (E^2 + p^2)|)``, float32 rounding noise for a
massless particle) and is used only to load published weights;
``arithmetic="stable"`` (default) uses ``asinh(pz / pT)`` and gives a massless
constituent a mass of exactly zero, so trained models never learn rounding noise.
"""

import math

import keras
import numpy as np
from keras import layers, ops

from paper_kd.models.inputs import check_inputs, reference_dot, stable_mass_squared

__all__ = [
    "ARITHMETICS",
    "MLP",
    "ConstituentFeatures",
    "DeepSet",
    "EnergyFlowNetwork",
    "ParticleFlowNetwork",
]

ARITHMETICS = ("stable", "reference")

# PyTorch defaults of the published students (LeakyReLU slope, BatchNorm eps and
# momentum; PyTorch's momentum 0.1 is Keras's 0.9).
_LEAKY_SLOPE = 0.01
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9

# Smallest transverse momentum (GeV) in a division: keeps eta finite along the beam.
_PT_FLOOR = 1e-12
# The jet pT used in pT fractions is at least this fraction of the jet energy, so a
# jet boosted until its total pT nearly vanishes still gives finite fractions (<= 1e4).
# Real jets (|eta_jet| < 7.6) are never affected.
_JET_PT_FLOOR_FRACTION = 1e-4
# |pz / |p|| is clipped below 1 so that atanh stays finite (|eta| <= 8.3 in float32).
_ATANH_LIMIT = 1.0 - 1e-7


def _check_arithmetic(arithmetic):
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    return arithmetic


# Limitation: Keras updates the moving variance with the biased batch variance where
# PyTorch uses the unbiased one; they differ by n / (n - 1), negligible for batches of
# thousands of constituents, so trained models are unaffected in practice.
def _batch_norm(name):
    return layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="paper_kd")
class ConstituentFeatures(layers.Layer):
    """Per-constituent ``(pT fraction, delta eta, delta phi, mass)`` and the pT fractions.

    Call on ``(p4, mask)`` with ``p4`` ``[B, N, 4]`` and boolean ``mask`` ``[B, N]``;
    returns ``features`` ``[B, N, 4]`` (zero on padding) and ``pt_fraction``
    ``[B, N]`` (zero on padding). Padding may hold anything: it is zeroed first.

    Example:
        >>> features, pt_fraction = ConstituentFeatures()(p4, mask)
    """

    def __init__(self, arithmetic="stable", **kwargs):
        super().__init__(**kwargs)
        self.arithmetic = _check_arithmetic(arithmetic)

    def call(self, p4, mask):
        mask3 = ops.expand_dims(mask, -1)
        p4 = ops.where(mask3, p4, ops.zeros_like(p4))
        jet = ops.sum(p4, axis=1)  # [batch, 4]

        pt = ops.sqrt(p4[..., 1] ** 2 + p4[..., 2] ** 2)  # [batch, node]
        jet_pt = ops.sqrt(jet[:, 1] ** 2 + jet[:, 2] ** 2)
        jet_pt = ops.maximum(jet_pt, ops.maximum(_JET_PT_FLOOR_FRACTION * jet[:, 0], _PT_FLOOR))
        pt_fraction = pt / ops.expand_dims(jet_pt, -1)

        delta_eta = self._eta(p4) - ops.expand_dims(self._eta(jet), -1)
        phi_jet = ops.arctan2(jet[:, 2], jet[:, 1])
        delta_phi = ops.arctan2(p4[..., 2], p4[..., 1]) - ops.expand_dims(phi_jet, -1)
        delta_phi = ops.mod(delta_phi + math.pi, 2.0 * math.pi) - math.pi

        if self.arithmetic == "reference":
            mass = ops.sqrt(ops.abs(reference_dot(p4, p4)))
        else:
            mass = ops.sqrt(ops.maximum(stable_mass_squared(p4), 0.0))

        features = ops.stack([pt_fraction, delta_eta, delta_phi, mass], axis=-1)  # [b, n, 4]
        features = ops.where(mask3, features, ops.zeros_like(features))
        pt_fraction = ops.where(mask, pt_fraction, ops.zeros_like(pt_fraction))
        return features, pt_fraction

    def _eta(self, p4):
        """Pseudorapidity of ``p4`` ``[..., 4]``; finite for padding and along the beam."""
        pz = p4[..., 3]
        if self.arithmetic == "reference":
            momentum = ops.sqrt(ops.sum(p4[..., 1:] ** 2, axis=-1))
            ratio = pz / ops.maximum(momentum, _PT_FLOOR)
            return ops.arctanh(ops.clip(ratio, -_ATANH_LIMIT, _ATANH_LIMIT))
        pt = ops.sqrt(p4[..., 1] ** 2 + p4[..., 2] ** 2)
        return ops.arcsinh(pz / ops.maximum(pt, _PT_FLOOR))

    def compute_output_spec(self, p4, mask):
        shape = tuple(p4.shape)
        return (
            keras.KerasTensor(shape, dtype=self.compute_dtype),
            keras.KerasTensor(shape[:-1], dtype=self.compute_dtype),
        )

    def get_config(self):
        return {**super().get_config(), "arithmetic": self.arithmetic}


class _Student(keras.Model):
    """Shared plumbing: input checks, feature layer, state-dict loading."""

    model_name = "student"

    def _features(self, inputs):
        p4, mask = check_inputs(inputs, self.model_name)
        p4 = ops.cast(p4, self.compute_dtype)
        features, pt_fraction = self.constituent_features(p4, mask)
        return features, pt_fraction, mask

    def build(self, input_shape=None):
        # Sublayers are built by tracing once on a tiny batch; ``input_shape`` (a dict
        # of shapes, or None) only fixes nothing the architecture depends on.
        if self.built:
            return
        dummy = {
            "p4": ops.ones((2, 3, 4), dtype="float32"),
            "mask": ops.ones((2, 3), dtype="bool"),
        }
        self.call(dummy, training=False)
        self.built = True

    def _torch_variables(self):
        raise NotImplementedError

    @classmethod
    def from_torch_state_dict(cls, state, **hparams):
        """Build the model from a PyTorch state dict (a mapping of names to arrays).

        Every tensor of the architecture must be present with the expected shape and
        no other tensor (except ``num_batches_tracked``) may be; the first mismatch is
        named in a ``ValueError`` and nothing is loaded. Loading published weights
        defaults to ``arithmetic="reference"``.
        """
        from paper_kd.models.weights import assign_torch_state

        hparams.setdefault("arithmetic", "reference")
        model = cls(**hparams)
        model.build()
        assign_torch_state(model._torch_variables(), state, model_name=cls.__name__)
        return model


def _dense_variables(prefix, dense):
    """(torch name, variable, transform) of a Dense layer in PyTorch Linear layout."""
    return [
        (f"{prefix}.weight", dense.kernel, np.transpose),
        (f"{prefix}.bias", dense.bias, None),
    ]


def _norm_variables(prefix, norm):
    return [
        (f"{prefix}.weight", norm.gamma, None),
        (f"{prefix}.bias", norm.beta, None),
        (f"{prefix}.running_mean", norm.moving_mean, None),
        (f"{prefix}.running_var", norm.moving_variance, None),
    ]


def _small_input_dense(dense, x):
    """``dense(x)`` for a handful of input features, as broadcast multiply-adds.

    On four features a matrix multiply is bound by writing its output; written as
    elementwise products, XLA fuses it with the activation and normalization that
    follow (about 30% faster for the Deep Set on CPU).
    """
    kernel = dense.kernel
    hidden = dense.bias + x[..., 0:1] * kernel[0]
    for j in range(1, kernel.shape[0]):
        hidden = hidden + x[..., j : j + 1] * kernel[j]
    return dense.activation(hidden)


@keras.saving.register_keras_serializable(package="paper_kd")
class DeepSet(_Student):
    """The paper's Deep Set student with pT-fraction-weighted pooling.

    ``phi`` (per real constituent): ``depth - 1`` blocks of Dense(width) ->
    LeakyReLU(0.01) -> Dropout -> BatchNorm (statistics over real constituents
    only), then Dense(latent). Pooling: ``sum_i (pT_i / pT_jet) phi_i``. ``rho``:
    BatchNorm, ``depth - 1`` blocks of Dense(width) -> LeakyReLU -> Dropout ->
    BatchNorm, then Dense(n_classes) giving the logits. With the published
    hyperparameters (width 128, latent 128, depth 3) ``phi`` has three Dense layers.
    The last Dense of ``phi`` is linear, so it is applied after the pooling, once per
    jet: the same function with half the multiply-accumulates.

    Example:
        >>> model = DeepSet()
        >>> logits = model({"p4": p4, "mask": mask})  # [batch, 2]
    """

    model_name = "DeepSet"

    def __init__(
        self,
        n_features=4,
        width=128,
        latent=128,
        depth=3,
        dropout=0.0,
        n_classes=2,
        arithmetic="stable",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if n_features != 4:
            raise ValueError(f"DeepSet: n_features must be 4 (computed inside), got {n_features}")
        if depth < 1:
            raise ValueError(f"DeepSet: depth must be >= 1, got {depth}")
        self.n_features = n_features
        self.width = width
        self.latent = latent
        self.depth = depth
        self.dropout = dropout
        self.n_classes = n_classes
        self.arithmetic = _check_arithmetic(arithmetic)

        self.constituent_features = ConstituentFeatures(arithmetic, name="features")
        self.phi_dense = [layers.Dense(width, name=f"phi_dense_{k}") for k in range(depth - 1)]
        self.phi_dropout = [layers.Dropout(dropout) for _ in range(depth - 1)]
        self.phi_norm = [_batch_norm(f"phi_norm_{k}") for k in range(depth - 1)]
        self.phi_out = layers.Dense(latent, name="phi_out")
        # Both are applied by hand (see ``call``), so they are built here.
        self.phi_out.build((None, width if depth > 1 else n_features))
        if self.phi_dense:
            self.phi_dense[0].build((None, n_features))
        self.rho_input_norm = _batch_norm("rho_input_norm")
        self.rho_dense = [layers.Dense(width, name=f"rho_dense_{k}") for k in range(depth - 1)]
        self.rho_dropout = [layers.Dropout(dropout) for _ in range(depth - 1)]
        self.rho_norm = [_batch_norm(f"rho_norm_{k}") for k in range(depth - 1)]
        self.classifier = layers.Dense(n_classes, name="classifier")

    def call(self, inputs, training=None):
        features, pt_fraction, mask = self._features(inputs)

        hidden = features  # [batch, node, 4]
        for k, (dense, dropout, norm) in enumerate(
            zip(self.phi_dense, self.phi_dropout, self.phi_norm)
        ):
            hidden = _small_input_dense(dense, hidden) if k == 0 else dense(hidden)
            hidden = ops.leaky_relu(hidden, negative_slope=_LEAKY_SLOPE)
            hidden = dropout(hidden, training=training)
            hidden = norm(hidden, training=training, mask=mask)  # [batch, node, width]

        # The last Linear of phi commutes with the weighted sum:
        #   sum_i z_i (W h_i + b) = W (sum_i z_i h_i) + b sum_i z_i,
        # so it runs once per jet instead of once per constituent (half the MACs).
        # pt_fraction is zero on padding, so padding never enters either sum.
        pooled = ops.einsum("bn,bnw->bw", pt_fraction, hidden)  # [batch, width]
        weight_sum = ops.sum(pt_fraction, axis=1, keepdims=True)  # [batch, 1]
        pooled = ops.matmul(pooled, self.phi_out.kernel) + weight_sum * self.phi_out.bias

        hidden = self.rho_input_norm(pooled, training=training)
        for dense, dropout, norm in zip(self.rho_dense, self.rho_dropout, self.rho_norm):
            hidden = ops.leaky_relu(dense(hidden), negative_slope=_LEAKY_SLOPE)
            hidden = dropout(hidden, training=training)
            hidden = norm(hidden, training=training)  # [batch, width]
        return self.classifier(hidden)  # [batch, n_classes]

    def _torch_variables(self):
        """The published layout: ``phi.{4k}``/``phi.{4k+3}``, ``rho.0``, ``rho.{4k+1}``..."""
        variables = []
        for k, (dense, norm) in enumerate(zip(self.phi_dense, self.phi_norm)):
            variables += _dense_variables(f"phi.{4 * k}", dense)
            variables += _norm_variables(f"phi.{4 * k + 3}", norm)
        variables += _dense_variables(f"phi.{4 * (self.depth - 1)}", self.phi_out)
        variables += _norm_variables("rho.0", self.rho_input_norm)
        for k, (dense, norm) in enumerate(zip(self.rho_dense, self.rho_norm)):
            variables += _dense_variables(f"rho.{4 * k + 1}", dense)
            variables += _norm_variables(f"rho.{4 * k + 4}", norm)
        variables += _dense_variables("output_layer.0", self.classifier)
        return variables

    def get_config(self):
        return {
            **super().get_config(),
            "n_features": self.n_features,
            "width": self.width,
            "latent": self.latent,
            "depth": self.depth,
            "dropout": self.dropout,
            "n_classes": self.n_classes,
            "arithmetic": self.arithmetic,
        }


@keras.saving.register_keras_serializable(package="paper_kd")
class MLP(_Student):
    """The paper's MLP student on the leading constituents' features, flattened.

    The first ``n_constituents`` slots of the input (pT-sorted in the canonical
    format) give ``n_constituents * 4`` features, zero for padding and for slots
    beyond the jet; then ``depth - 1`` blocks of Dense(width) -> LeakyReLU(0.01)
    -> Dropout -> BatchNorm and Dense(n_classes).

    Example:
        >>> logits = MLP()({"p4": p4, "mask": mask})  # [batch, 2]
    """

    # Limitation: the MLP reads constituents in input order, as the published one
    # does; it is not invariant under permutations of the constituents, and a boost
    # that reorders constituents in pT is not re-sorted. Extra zero padding after
    # the jet leaves it unchanged.

    model_name = "MLP"

    def __init__(
        self,
        n_constituents=128,
        n_features=4,
        width=512,
        depth=3,
        dropout=0.0,
        n_classes=2,
        arithmetic="stable",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if n_features != 4:
            raise ValueError(f"MLP: n_features must be 4 (computed inside), got {n_features}")
        if depth < 1:
            raise ValueError(f"MLP: depth must be >= 1, got {depth}")
        self.n_constituents = n_constituents
        self.n_features = n_features
        self.width = width
        self.depth = depth
        self.dropout = dropout
        self.n_classes = n_classes
        self.arithmetic = _check_arithmetic(arithmetic)

        self.constituent_features = ConstituentFeatures(arithmetic, name="features")
        self.hidden_dense = [layers.Dense(width, name=f"dense_{k}") for k in range(depth - 1)]
        self.hidden_dropout = [layers.Dropout(dropout) for _ in range(depth - 1)]
        self.hidden_norm = [_batch_norm(f"norm_{k}") for k in range(depth - 1)]
        self.classifier = layers.Dense(n_classes, name="classifier")

    def call(self, inputs, training=None):
        features, _, _ = self._features(inputs)

        # Keep the leading slots and pad to exactly n_constituents.
        features = features[:, : self.n_constituents]
        missing = self.n_constituents - ops.shape(features)[1]
        features = ops.pad(features, [[0, 0], [0, ops.maximum(missing, 0)], [0, 0]])
        hidden = ops.reshape(features, (-1, self.n_constituents * self.n_features))  # [b, 512]

        for dense, dropout, norm in zip(self.hidden_dense, self.hidden_dropout, self.hidden_norm):
            hidden = ops.leaky_relu(dense(hidden), negative_slope=_LEAKY_SLOPE)
            hidden = dropout(hidden, training=training)
            hidden = norm(hidden, training=training)  # [batch, width]
        return self.classifier(hidden)  # [batch, n_classes]

    def _torch_variables(self):
        """The published layout: ``mlp.{4k}`` (Linear), ``mlp.{4k+3}`` (BatchNorm)."""
        variables = []
        for k, (dense, norm) in enumerate(zip(self.hidden_dense, self.hidden_norm)):
            variables += _dense_variables(f"mlp.{4 * k}", dense)
            variables += _norm_variables(f"mlp.{4 * k + 3}", norm)
        variables += _dense_variables("output_layer.0", self.classifier)
        return variables

    def get_config(self):
        return {
            **super().get_config(),
            "n_constituents": self.n_constituents,
            "n_features": self.n_features,
            "width": self.width,
            "depth": self.depth,
            "dropout": self.dropout,
            "n_classes": self.n_classes,
            "arithmetic": self.arithmetic,
        }


class _FlowNetwork(_Student):
    """Komiske et al.'s Phi -> sum -> F, with ReLU activations and logits out."""

    def __init__(
        self,
        phi_sizes=(100, 100, 128),
        f_sizes=(100, 100, 100),
        dropout=0.0,
        n_classes=2,
        arithmetic="stable",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.phi_sizes = tuple(int(size) for size in phi_sizes)
        self.f_sizes = tuple(int(size) for size in f_sizes)
        if not self.phi_sizes:
            raise ValueError(f"{self.model_name}: phi_sizes must not be empty")
        self.dropout = dropout
        self.n_classes = n_classes
        self.arithmetic = _check_arithmetic(arithmetic)

        self.constituent_features = ConstituentFeatures(arithmetic, name="features")
        self.phi_dense = [
            layers.Dense(size, activation="relu", name=f"phi_dense_{k}")
            for k, size in enumerate(self.phi_sizes)
        ]
        self.f_dense = [
            layers.Dense(size, activation="relu", name=f"f_dense_{k}")
            for k, size in enumerate(self.f_sizes)
        ]
        self.f_dropout = [layers.Dropout(dropout) for _ in self.f_sizes]
        self.classifier = layers.Dense(n_classes, name="classifier")

    def _pool(self, features, pt_fraction, mask):
        raise NotImplementedError

    def call(self, inputs, training=None):
        features, pt_fraction, mask = self._features(inputs)
        hidden = self._pool(features, pt_fraction, mask)  # [batch, latent]
        for dense, dropout in zip(self.f_dense, self.f_dropout):
            hidden = dropout(dense(hidden), training=training)
        return self.classifier(hidden)  # [batch, n_classes]

    def _phi(self, hidden):
        for dense in self.phi_dense:
            hidden = dense(hidden)
        return hidden  # [batch, node, latent]

    def _torch_variables(self):
        raise ValueError(f"{self.model_name}: no published PyTorch layout to load")

    def get_config(self):
        return {
            **super().get_config(),
            "phi_sizes": list(self.phi_sizes),
            "f_sizes": list(self.f_sizes),
            "dropout": self.dropout,
            "n_classes": self.n_classes,
            "arithmetic": self.arithmetic,
        }


@keras.saving.register_keras_serializable(package="paper_kd")
class ParticleFlowNetwork(_FlowNetwork):
    """Particle Flow Network: ``F(sum_i Phi(features_i))`` over real constituents.

    Example:
        >>> logits = ParticleFlowNetwork()({"p4": p4, "mask": mask})  # [batch, 2]
    """

    model_name = "ParticleFlowNetwork"

    def _pool(self, features, pt_fraction, mask):
        weights = ops.cast(mask, features.dtype)
        return ops.einsum("bn,bnl->bl", weights, self._phi(features))


@keras.saving.register_keras_serializable(package="paper_kd")
class EnergyFlowNetwork(_FlowNetwork):
    """Energy Flow Network: ``F(sum_i z_i Phi(delta eta_i, delta phi_i))``, ``z = pT fraction``.

    IRC safe by construction: ``Phi`` sees only angles and the sum is linear in ``z``.

    Example:
        >>> logits = EnergyFlowNetwork()({"p4": p4, "mask": mask})  # [batch, 2]
    """

    model_name = "EnergyFlowNetwork"

    def _pool(self, features, pt_fraction, mask):
        angles = features[..., 1:3]  # [batch, node, 2]
        return ops.einsum("bn,bnl->bl", pt_fraction, self._phi(angles))
