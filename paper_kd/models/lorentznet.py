"""LorentzNet, the Lorentz-group-equivariant teacher (Gong et al., JHEP 07 (2022) 030).

The network of arXiv:2201.08187 as used by arXiv:2311.14160: node scalars (masses)
are embedded, six Lorentz group equivariant blocks (LGEB) exchange messages over
the complete graph of a jet's constituents (plus two beam particles) while
updating the four-momenta ("coordinates") equivariantly, and a mean over nodes
feeds a small decoder that gives two logits.

The computation is dense over ``[batch, node, node]`` with an explicit boolean
mask: padding nodes, padding edges and self-loops never enter a sum, a mean or
BatchNorm statistics. The first edge layer acts on ``[h_i, h_j, norm_ij, dot_ij]``;
it is evaluated as ``h_i W_a + h_j W_b + norm_ij w_n + dot_ij w_d`` (the same
linear map, split), so no ``[batch, node, node, 2 hidden + 2]`` concatenation is
ever built.

Two arithmetic modes for the Minkowski products:

- ``"stable"`` (default): plain products, and massless constituents get a mass of
  exactly zero (``stable_mass_squared``), so a trained model does not read
  float32 rounding noise;
- ``"reference"``: the published float32 formula ``2 a0 b0 - sum_i a_i b_i`` for
  masses, norms and products and ``log(1 + |x|)`` in ``psi``, bit for bit as the
  published PyTorch code; only for loading published weights.

With ``readout="reference"`` the node mean divides by the padded node count, as
the published code does; together with ``arithmetic="reference"`` the model
reproduces the published logits (see ``lorentznet_parity``).

Speed: the model runs with and without XLA (``model.compile(..., jit_compile=True)``;
Keras's ``"auto"`` never picks XLA on a CPU-only machine). XLA compiles once per
input shape, so batches should come in a few fixed node counts (for example padded
to a multiple of 8 or bucketed), not one width per batch. The per-edge layers run
one jet at a time with ``jet_loop=True``: a jet's ``[node, node, hidden]``
tensors fit in the processor's cache, a batch's do not. Measured with XLA at the
paper's size (batch 32, random batches), its gain depends on the cache: 1.4 times
the training rate on a 2-core development machine, 1.08 times (inference 1.2
times) on a 2-core AMD EPYC with 32 MB of L3 cache, and 0.9 times there on
batches bucketed by multiplicity (narrow already). It is off by default: without
XLA or for a small model the loop's per-jet overhead costs more than the cache saves.

Example:
    >>> model = LorentzNet()
    >>> logits = model({"p4": p4, "mask": mask})  # [batch, 2]
"""

import logging

import keras
import numpy as np
from keras import ops

from paper_kd.models.inputs import (
    check_inputs,
    minkowski_dot,
    stable_mass_squared,
)

__all__ = [
    "LorentzEquivariantBlock",
    "LorentzNet",
    "MaskedBatchNormalization",
    "PARITY_BOUNDS",
    "lorentznet_parity",
    "masked_moments",
    "psi",
    "split_edge_moments",
    "torch_hparams",
]

logger = logging.getLogger(__name__)

READOUTS = ("mean", "reference")

# Agreement with the published logits required of a model loading the published weights:
# |delta logit| / (1 + |logit|) quantiles, and the fraction of jets with the same class.
PARITY_BOUNDS = {"median": 1e-4, "p99": 2e-3, "max": 1e-2, "agreement": 0.995}
ARITHMETICS = ("stable", "reference")

# Clamp on each edge's coordinate update, as in the published code (inherited from EGNN).
_COORDINATE_CLAMP = 100.0


def psi(x, arithmetic="stable"):
    """``sign(x) log(1 + |x|)``; the reference mode keeps the published ``log(|x| + 1)``."""
    if arithmetic == "reference":
        return ops.sign(x) * ops.log(ops.abs(x) + 1.0)
    return ops.sign(x) * ops.log1p(ops.abs(x))


def _dot(a, b, arithmetic):
    if arithmetic != "reference":
        return minkowski_dot(a, b)
    # The published float32 formula with its rounding: every product rounded on its
    # own, then summed left to right. Two compilers would change that rounding, which
    # is exactly the noise the published weights read: XLA always contracts a product
    # feeding a sum into one fused multiply-add (parity drops from 1e-6 to 6e-2
    # median), so the products pass through a conditional XLA cannot fuse across;
    # TensorFlow's graph optimizer may regroup a chain of additions, so each partial
    # sum is rounded through float64 (exact: float32 + float32 rounded twice via
    # float64 equals the float32 sum). Equals ``reference_dot`` bit for bit.
    products = _unfused(a * b)
    total = products[..., 0]
    for component in range(1, 4):
        wide = ops.cast(total, "float64") + ops.cast(products[..., component], "float64")
        total = ops.cast(wide, products.dtype)
    return 2.0 * products[..., 0] - total


def _unfused(x):
    """``x``, materialized: a data-dependent conditional is a fusion barrier for XLA."""
    first = ops.reshape(x, (-1,))[0]
    # ``first == first`` is false only for NaN, which check_inputs already rejects.
    return ops.cond(first == first, lambda: x, lambda: ops.zeros_like(x))


def _jet_by_jet(edge_pass, pieces, weights):
    """``edge_pass(*pieces, *weights)`` computed one jet at a time, recomputed for gradients.

    Every piece has the batch as its first axis and the result is the same as one
    call on the whole batch (each jet's edges only meet its own nodes). The gain is
    memory traffic: one jet's ``[N, N, hidden]`` temporaries (2 MB at 90 nodes and
    width 72) stay in the processor's cache, where the whole batch's (70 MB at 32
    jets) stream through memory once per elementwise pass. The backward pass
    recomputes each jet's forward pass instead of storing it (``tf.recompute_grad``):
    a third more matrix-multiply work, much less traffic. BatchNorm statistics are
    not affected: they are computed from the whole batch before the loop.
    """
    import tensorflow as tf

    single = tf.recompute_grad(lambda *args: edge_pass(*args))
    # Each element is a batch of one jet, [1, ...], so edge_pass runs unchanged.
    elements = tuple(ops.expand_dims(piece, 1) for piece in pieces)
    dtype = pieces[0].dtype
    outputs = tf.map_fn(
        lambda element: single(*element, *weights),
        elements,
        fn_output_signature=(dtype, dtype),
        parallel_iterations=1,
    )
    return tuple(ops.squeeze(output, 1) for output in outputs)


def _masked_sum(x, mask, axis):
    return ops.sum(ops.where(mask, x, ops.zeros_like(x)), axis=axis)


def masked_moments(x, mask):
    """Mean and biased variance over the last axis's entries where ``mask`` is true.

    ``x`` [..., C], ``mask`` bool [...]; returns ``(mean [C], variance [C], count)``.
    """
    axes = tuple(range(len(x.shape) - 1))
    mask = ops.expand_dims(mask, -1)
    count = ops.sum(ops.cast(mask, x.dtype))
    safe_count = ops.maximum(count, 1.0)
    mean = _masked_sum(x, mask, axes) / safe_count  # [channel]
    variance = _masked_sum(ops.square(x - mean), mask, axes) / safe_count
    return mean, variance, count


def split_edge_moments(node_i, node_j, invariants, kernel, edge_mask):
    """Masked moments of ``e_ij = node_i[i] + node_j[j] + invariants_ij @ kernel``.

    The edge tensor ``[B, N, N, C]`` is never built: its mean and biased variance
    over the edges where ``edge_mask`` is true are sums of per-node and per-edge
    scalar terms (the cross term ``sum_ij m_ij a_i b_j`` is one batched matrix
    product). The pieces are centred on their own weighted means first, so the
    variance is a sum of squares of centred terms, without the cancellation of
    ``E[e^2] - E[e]^2``. Exact in real arithmetic; equal to ``masked_moments`` of
    the built tensor to float32 rounding.

    Args:
        node_i, node_j: [B, N, C] per-node pieces.
        invariants: [B, N, N, K] per-edge scalars; ``kernel`` [K, C].
        edge_mask: bool [B, N, N].

    Returns:
        ``(mean [C], variance [C], count)``.
    """
    dtype = node_i.dtype
    weight = ops.cast(edge_mask, dtype)  # [batch, node, node]
    count = ops.sum(weight)
    safe_count = ops.maximum(count, 1.0)
    out_degree = ops.expand_dims(ops.sum(weight, axis=2), -1)  # [batch, node, 1]
    in_degree = ops.expand_dims(ops.sum(weight, axis=1), -1)

    weight_k = ops.expand_dims(weight, -1)
    mean_i = ops.sum(out_degree * node_i, axis=(0, 1)) / safe_count  # [channel]
    mean_j = ops.sum(in_degree * node_j, axis=(0, 1)) / safe_count
    mean_k = ops.sum(weight_k * invariants, axis=(0, 1, 2)) / safe_count  # [K]
    a = node_i - mean_i
    b = node_j - mean_j
    u = (invariants - mean_k) * weight_k  # [batch, node, node, K], zero off the mask

    # sum over edges of (a_i + b_j + u_ij kernel)^2, term by term.
    square = ops.sum(out_degree * ops.square(a), axis=(0, 1))
    square += ops.sum(in_degree * ops.square(b), axis=(0, 1))
    uu = ops.einsum("bijk,bijl->kl", u, u)  # [K, K]
    square += ops.sum(kernel * ops.matmul(uu, kernel), axis=0)
    square += 2.0 * ops.sum(a * ops.matmul(weight, b), axis=(0, 1))
    u_i = ops.sum(u, axis=2)  # [batch, node, K]: sum over j of u_ij
    u_j = ops.sum(u, axis=1)  # [batch, node, K]: sum over i of u_ij
    square += 2.0 * ops.sum(a * ops.matmul(u_i, kernel), axis=(0, 1))
    square += 2.0 * ops.sum(b * ops.matmul(u_j, kernel), axis=(0, 1))

    mean = mean_i + mean_j + ops.matmul(ops.expand_dims(mean_k, 0), kernel)[0]
    variance = ops.maximum(square / safe_count, 0.0)
    return mean, variance, count


@keras.saving.register_keras_serializable(package="paper_kd")
class MaskedBatchNormalization(keras.layers.Layer):
    """BatchNorm over the last axis whose batch statistics use only masked-in entries.

    Training normalizes with the mean and biased variance of the entries where
    ``mask`` is true and updates the moving statistics as PyTorch does (moving
    variance from the unbiased estimate); inference uses the moving statistics.
    Defaults are PyTorch's: ``epsilon=1e-5`` and ``momentum=0.9`` (PyTorch 0.1).

    Args:
        momentum: weight of the old moving statistics in each update.
        epsilon: added to the variance.

    Example:
        >>> norm = MaskedBatchNormalization()
        >>> y = norm(x, mask, training=True)  # x [..., C], mask [...] bool
    """

    def __init__(self, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = (int(input_shape[-1]),)
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(
            shape=channels, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=channels, initializer="ones", trainable=False, name="moving_variance"
        )

    def affine(self, x, mask, training=False):
        """Per-channel ``(scale, shift)`` with ``normalized = x * scale + shift``.

        In training this computes the masked batch statistics of ``x`` and updates
        the moving ones.
        """
        moments = masked_moments(x, mask) if training else None
        return self.affine_from_moments(moments, training)

    def affine_from_moments(self, moments, training=False):
        """``(scale, shift)`` from batch ``moments = (mean, variance, count)`` in training.

        ``variance`` is the biased one. A caller that knows the moments of an
        expression without building it (LGEB's edges: a sum of per-node pieces)
        normalizes that expression through the pieces. In inference ``moments`` is
        unused and the moving statistics apply.
        """
        dtype = self.compute_dtype
        if training:
            mean, variance, count = moments
            dtype = mean.dtype
            unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
            momentum = ops.cast(self.momentum, dtype)
            for variable, value in ((self.moving_mean, mean), (self.moving_variance, unbiased)):
                updated = momentum * ops.cast(variable, dtype) + (1.0 - momentum) * value
                variable.assign(ops.cast(updated, variable.dtype))
        else:
            mean = ops.cast(self.moving_mean, dtype)
            variance = ops.cast(self.moving_variance, dtype)
        scale = ops.cast(self.gamma, dtype) * ops.rsqrt(variance + self.epsilon)
        shift = ops.cast(self.beta, dtype) - mean * scale
        return scale, shift

    def call(self, x, mask, training=False):
        scale, shift = self.affine(x, mask, training)
        return x * scale + shift

    def compute_output_shape(self, input_shape, mask_shape=None):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


# Limitation: training cost is bound by the two hidden x hidden matrix products per
# edge in each block (phi_e's second Linear, phi_x's first), three times over with the
# backward pass (four with the jet loop's recomputation): about 1.2 GFLOP per jet of
# 57 constituents (59 nodes, width 72, 6 blocks), and by padding: a batch computes
# every jet's edges at the width of its largest jet (about 2.2 times the real edges
# for random batches of 32) unless it is bucketed by multiplicity. Profile of the
# compiled (XLA) training step at the paper's size, random batches of 32, 2-core AMD
# EPYC (`paper-kd bench`, benchmarks/dev-2026-12-04-full.md): the matrix products take
# 54% of the time at 101 GFLOP/s, half the measured peak (K = 72: each product reads
# and writes a [B, N, N, 72] tensor, 18 FLOPs per byte moved: partly memory-bound),
# the gradient's reductions over the edge tensors (sums over i and over j for the
# per-node pieces, over everything for biases) 22%, elementwise fusions the rest.
# So the products alone cap training at ~36 jets/s on random batches, ~59 bucketed.
@keras.saving.register_keras_serializable(package="paper_kd")
class LorentzEquivariantBlock(keras.layers.Layer):
    """One Lorentz group equivariant block (LGEB).

    With node features ``h`` and coordinates ``x`` (four-vectors) at the block's start:

    - edge invariants ``norm_ij = psi(<x_i - x_j, x_i - x_j>)``, ``dot_ij = psi(<x_i, x_j>)``;
    - message ``m_ij = phi_e(h_i, h_j, norm_ij, dot_ij) * sigmoid(phi_m(m_ij))`` with
      ``phi_e`` = Linear (no bias) -> BatchNorm -> ReLU -> Linear -> ReLU;
    - coordinates (not in the last block)
      ``x_i + c_weight * mean_j clamp((x_i - x_j) phi_x(m_ij), +-100)``;
    - nodes ``h_i + phi_h([h_i, sum_j m_ij, scalars_i])``, ``phi_h`` = Linear -> BatchNorm
      -> ReLU -> Linear.

    Sums and means run over the real neighbours ``j != i`` (``edge_mask``); both
    BatchNorms use statistics of real edges / real nodes only.

    Args:
        n_hidden: width of ``h`` and of every hidden layer.
        n_scalar: number of node scalars fed to ``phi_h``.
        c_weight: step size of the coordinate update.
        last_block: the last block has no coordinate update (no ``phi_x``).
        arithmetic: ``"stable"`` or ``"reference"`` Minkowski products (module docstring).
        jet_loop: run the per-edge layers one jet at a time (``_jet_by_jet``): the same
            function, faster with XLA at the paper's size (module docstring).
    """

    def __init__(
        self,
        n_hidden=72,
        n_scalar=2,
        c_weight=5e-3,
        last_block=False,
        arithmetic="stable",
        jet_loop=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
        self.jet_loop = bool(jet_loop)
        self.n_hidden = int(n_hidden)
        self.n_scalar = int(n_scalar)
        self.c_weight = float(c_weight)
        self.last_block = bool(last_block)
        self.arithmetic = arithmetic

        hidden = self.n_hidden
        self.edge_norm = MaskedBatchNormalization(name="edge_norm")
        self.message_dense = keras.layers.Dense(hidden, activation="relu", name="message_dense")
        self.gate_dense = keras.layers.Dense(1, name="gate_dense")
        if not self.last_block:
            self.coordinate_hidden = keras.layers.Dense(hidden, name="coordinate_hidden")
            # Tiny initial coordinate updates, as the published code initializes phi_x.
            self.coordinate_out = keras.layers.Dense(
                1,
                use_bias=False,
                kernel_initializer=keras.initializers.VarianceScaling(
                    scale=1e-6, mode="fan_avg", distribution="uniform"
                ),
                name="coordinate_out",
            )
        self.node_hidden = keras.layers.Dense(hidden, name="node_hidden")
        self.node_norm = MaskedBatchNormalization(name="node_norm")
        self.node_out = keras.layers.Dense(hidden, name="node_out")

    def build(self, input_shape=None):
        if self.built:
            return
        hidden = self.n_hidden
        # phi_e's first Linear on [h_i, h_j, norm_ij, dot_ij]: rows in that order.
        self.edge_kernel = self.add_weight(
            shape=(2 * hidden + 2, hidden), initializer="glorot_uniform", name="edge_kernel"
        )
        self.edge_norm.build((None, hidden))
        self.message_dense.build((None, hidden))
        self.gate_dense.build((None, hidden))
        if not self.last_block:
            self.coordinate_hidden.build((None, hidden))
            self.coordinate_out.build((None, hidden))
        self.node_hidden.build((None, 2 * hidden + self.n_scalar))
        self.node_norm.build((None, hidden))
        self.node_out.build((None, hidden))

    def call(self, h, x, scalars, node_mask, edge_mask, training=False):
        """One block: ``(h [B, N, H], x [B, N, 4]) -> (h, x)``.

        ``scalars`` [B, N, n_scalar]; ``node_mask`` [B, N] and ``edge_mask`` [B, N, N]
        booleans (``edge_mask`` real ``i``, real ``j``, ``i != j``).
        """
        hidden = self.n_hidden
        x_i, x_j = ops.expand_dims(x, 2), ops.expand_dims(x, 1)
        x_diff = x_i - x_j  # [batch, node, node, 4]
        norms = psi(_dot(x_diff, x_diff, self.arithmetic), self.arithmetic)  # [B, N, N]
        dots = psi(_dot(x_i, x_j, self.arithmetic), self.arithmetic)

        kernel = ops.cast(self.edge_kernel, h.dtype)
        h_i = ops.matmul(h, kernel[:hidden])  # [batch, node, hidden]
        h_j = ops.matmul(h, kernel[hidden : 2 * hidden])
        invariants = ops.stack([norms, dots], axis=-1)  # [batch, node, node, 2]
        invariant_kernel = kernel[2 * hidden :]  # [2, hidden]
        # BatchNorm of the edges h_i W_a + h_j W_b + invariants W_inv folded into the
        # pieces: statistics from the pieces (split_edge_moments), then the affine map
        # applied to each piece, so the [B, N, N, hidden] pre-activation is built once.
        moments = None
        if training:
            moments = split_edge_moments(h_i, h_j, invariants, invariant_kernel, edge_mask)
        scale, shift = self.edge_norm.affine_from_moments(moments, training=training)
        node_i = h_i * scale + shift  # [batch, node, hidden]
        node_j = h_j * scale
        edge_weight = ops.cast(edge_mask, h.dtype)  # [batch, node, node]
        weights = self._edge_weights(h.dtype, invariant_kernel * scale)
        pieces = (node_i, node_j, invariants, edge_weight, x_diff)
        if self.jet_loop:
            aggregated, coordinate_sum = _jet_by_jet(self._edge_pass, pieces, weights)
        else:
            aggregated, coordinate_sum = self._edge_pass(*pieces, *weights)

        if not self.last_block:
            neighbours = ops.sum(edge_weight, axis=2)[..., None]  # [batch, node, 1]
            x = x + self.c_weight * coordinate_sum / ops.maximum(neighbours, 1.0)

        node_inputs = ops.concatenate([h, aggregated, scalars], axis=-1)
        node_update = self.node_norm(self.node_hidden(node_inputs), node_mask, training=training)
        h = h + self.node_out(ops.relu(node_update))
        return h, x

    def _edge_weights(self, dtype, invariant_kernel):
        """The weights of the per-edge layers as tensors, in ``_edge_pass``'s order."""
        layers = [self.message_dense, self.gate_dense]
        if not self.last_block:
            layers += [self.coordinate_hidden]
        weights = [invariant_kernel]
        for layer in layers:
            weights += [ops.cast(layer.kernel, dtype), ops.cast(layer.bias, dtype)]
        if not self.last_block:
            weights.append(ops.cast(self.coordinate_out.kernel, dtype))
        return weights

    def _edge_pass(self, node_i, node_j, invariants, edge_weight, x_diff, *weights):
        """Everything a block computes per edge, summed over each node's neighbours.

        ``node_i``, ``node_j`` [B, N, H] are the first edge layer's per-node pieces,
        already normalized; ``invariants`` [B, N, N, 2]; ``edge_weight`` [B, N, N] is
        1 on real edges, 0 elsewhere; ``x_diff`` [B, N, N, 4]. Returns
        ``sum_j m_ij`` [B, N, H] and ``sum_j clamp((x_i - x_j) phi_x(m_ij))`` [B, N, 4]
        (zeros in the last block). Weights come as arguments, not as captured
        variables, so that the jet loop can recompute this function in the backward pass.
        """
        invariant_kernel, message_kernel, message_bias, gate_kernel, gate_bias = weights[:5]
        edges = ops.relu(
            ops.expand_dims(node_i, 2)
            + ops.expand_dims(node_j, 1)
            # The per-edge scalars enter through one K = 2 matrix product: a single
            # pass over the [B, N, N, hidden] tensor where two broadcast products and
            # a sum took three.
            + ops.matmul(invariants, invariant_kernel)
        )  # [batch, node, node, hidden]
        messages = ops.relu(ops.matmul(edges, message_kernel) + message_bias)
        real = ops.expand_dims(edge_weight, -1) > 0  # [batch, node, node, 1]
        if self.last_block:
            gate_logit = ops.matmul(messages, gate_kernel)
        else:
            coordinate_kernel, coordinate_bias, coordinate_out = weights[5:]
            # phi_m's and phi_x's first layers read the messages in one product: one
            # pass over the [B, N, N, hidden] tensor (and one for its gradient) instead
            # of two. The product's last column is the gate's logit; it also runs
            # through phi_x, against a zero row of phi_x's output kernel, so the large
            # tensor is never sliced (a copy without XLA) and contributes exactly 0.
            both = ops.matmul(messages, ops.concatenate([coordinate_kernel, gate_kernel], axis=1))
            gate_logit = both[..., -1:]
            coordinate_bias = ops.pad(coordinate_bias, [(0, 1)])
            coordinate_out = ops.pad(coordinate_out, [(0, 1), (0, 0)])
        gate = ops.sigmoid(gate_logit + gate_bias)
        gate = ops.where(real, gate, ops.zeros_like(gate))
        # sum_j gate_ij m_ij as a batched product: no [B, N, N, hidden] temporary.
        aggregated = ops.einsum("bij,bijh->bih", gate[..., 0], messages)  # [batch, node, hidden]
        if self.last_block:
            return aggregated, ops.zeros_like(x_diff[:, :, 0])

        # phi_x(gate * messages): the gate is one number per edge, so it is applied
        # after the matrix product instead of to its [B, N, N, H] input.
        coordinate_hidden = ops.relu(gate * both + coordinate_bias)  # [..., hidden + 1]
        weight = ops.matmul(coordinate_hidden, coordinate_out)  # [batch, node, node, 1]
        shift = ops.clip(x_diff * weight, -_COORDINATE_CLAMP, _COORDINATE_CLAMP)
        return aggregated, _masked_sum(shift, real, 2)  # [batch, node, 4]

    def get_config(self):
        return {
            **super().get_config(),
            "n_hidden": self.n_hidden,
            "n_scalar": self.n_scalar,
            "c_weight": self.c_weight,
            "last_block": self.last_block,
            "arithmetic": self.arithmetic,
            "jet_loop": self.jet_loop,
        }


@keras.saving.register_keras_serializable(package="paper_kd")
class LorentzNet(keras.Model):
    """The LorentzNet jet tagger: embedding, ``n_layers`` LGEBs, node mean, decoder.

    Input ``{"p4": [B, N, 4], "mask": bool [B, N]}`` (GeV, ``(E, px, py, pz)``);
    output logits ``[B, n_classes]``. Two beam particles ``(sqrt 2, 0, 0, +-1)``
    are put in front of every jet inside the model when ``beams`` is true. Node
    scalars are ``psi([m, 0])`` for a constituent and ``psi([0, m])`` for a beam
    (``n_scalar=2``), or ``psi(m)`` (``n_scalar=1``).

    Args:
        n_hidden: node feature width (72 in the paper).
        n_layers: number of LGEBs (6).
        n_scalar: node scalars, 1 or 2 (2).
        c_weight: coordinate update step (5e-3).
        dropout: dropout rate in the decoder (0.2).
        n_classes: logits (2; index 1 = top).
        readout: ``"mean"`` over real nodes, or ``"reference"``: the published sum over
            real nodes divided by the padded node count (depends on padding; only for
            published weights).
        beams: add the two beam particles.
        arithmetic: ``"stable"`` or ``"reference"`` (module docstring).
        jet_loop: per-edge layers one jet at a time (module docstring); ``False`` runs
            them on the whole batch at once, the same function.

    Example:
        >>> model = LorentzNet(n_hidden=16, n_layers=2)
        >>> logits = model({"p4": p4, "mask": mask})
    """

    def __init__(
        self,
        n_hidden=72,
        n_layers=6,
        n_scalar=2,
        c_weight=5e-3,
        dropout=0.2,
        n_classes=2,
        readout="mean",
        beams=True,
        arithmetic="stable",
        jet_loop=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if readout not in READOUTS:
            raise ValueError(f"LorentzNet: readout must be one of {READOUTS}, got {readout!r}")
        if arithmetic not in ARITHMETICS:
            raise ValueError(
                f"LorentzNet: arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}"
            )
        if n_scalar not in (1, 2):
            raise ValueError(f"LorentzNet: n_scalar must be 1 or 2, got {n_scalar!r}")
        if int(n_layers) < 1 or int(n_hidden) < 1:
            raise ValueError("LorentzNet: n_layers and n_hidden must be positive")
        self.n_hidden = int(n_hidden)
        self.n_layers = int(n_layers)
        self.n_scalar = int(n_scalar)
        self.c_weight = float(c_weight)
        self.dropout = float(dropout)
        self.n_classes = int(n_classes)
        self.readout = readout
        self.beams = bool(beams)
        self.arithmetic = arithmetic
        self.jet_loop = bool(jet_loop)

        self.embedding = keras.layers.Dense(self.n_hidden, name="embedding")
        self.blocks = [
            LorentzEquivariantBlock(
                self.n_hidden,
                self.n_scalar,
                self.c_weight,
                last_block=index == self.n_layers - 1,
                arithmetic=arithmetic,
                jet_loop=self.jet_loop,
                name=f"lgeb_{index}",
            )
            for index in range(self.n_layers)
        ]
        self.decoder_hidden = keras.layers.Dense(
            self.n_hidden, activation="relu", name="decoder_hidden"
        )
        self.decoder_dropout = keras.layers.Dropout(self.dropout, name="decoder_dropout")
        self.decoder_out = keras.layers.Dense(self.n_classes, name="decoder_out")
        # Every weight's shape is known without an input: build now, so weights can be
        # set, counted or loaded before the first call.
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.embedding.build((None, self.n_scalar))
        for block in self.blocks:
            block.build()
        self.decoder_hidden.build((None, self.n_hidden))
        self.decoder_out.build((None, self.n_hidden))
        self.built = True

    def _add_beams(self, p4, mask):
        batch = ops.shape(p4)[0]
        beams = ops.convert_to_tensor(
            np.array([[np.sqrt(2.0), 0.0, 0.0, 1.0], [np.sqrt(2.0), 0.0, 0.0, -1.0]]),
            dtype=p4.dtype,
        )
        beams = ops.broadcast_to(ops.expand_dims(beams, 0), (batch, 2, 4))
        p4 = ops.concatenate([beams, p4], axis=1)  # [batch, 2 + node, 4]
        mask = ops.concatenate([ops.ones((batch, 2), dtype="bool"), mask], axis=1)
        return p4, mask

    def _scalars(self, p4, n_beams):
        if self.arithmetic == "reference":
            mass_squared = _dot(p4, p4, self.arithmetic)
        else:
            mass_squared = stable_mass_squared(p4)
        mass = psi(ops.sqrt(ops.abs(mass_squared)), self.arithmetic)  # [batch, node]
        if self.n_scalar == 1:
            return ops.expand_dims(mass, -1)
        is_beam = ops.arange(ops.shape(p4)[1]) < n_beams  # [node]
        is_beam = ops.expand_dims(ops.cast(is_beam, p4.dtype), 0)
        return ops.stack([mass * (1.0 - is_beam), mass * is_beam], axis=-1)

    def call(self, inputs, training=False):
        p4, mask = check_inputs(inputs, "LorentzNet")
        p4 = ops.cast(p4, self.compute_dtype)
        n_beams = 0
        if self.beams:
            p4, mask = self._add_beams(p4, mask)
            n_beams = 2

        scalars = self._scalars(p4, n_beams)  # [batch, node, n_scalar]
        n_nodes = ops.shape(p4)[1]
        not_self = ops.logical_not(ops.eye(n_nodes, dtype="bool"))
        edge_mask = ops.logical_and(
            ops.logical_and(ops.expand_dims(mask, 2), ops.expand_dims(mask, 1)), not_self
        )  # [batch, node, node]

        h = self.embedding(scalars)  # [batch, node, hidden]
        x = p4
        for block in self.blocks:
            h, x = block(h, x, scalars, mask, edge_mask, training=training)

        node_mask = ops.expand_dims(mask, -1)
        pooled = _masked_sum(h, node_mask, 1)  # [batch, hidden]
        if self.readout == "reference":
            pooled = pooled / ops.cast(n_nodes, pooled.dtype)
        else:
            count = ops.sum(ops.cast(node_mask, pooled.dtype), axis=1)
            pooled = pooled / ops.maximum(count, 1.0)
        hidden = self.decoder_dropout(self.decoder_hidden(pooled), training=training)
        return self.decoder_out(hidden)

    @classmethod
    def from_torch_state_dict(cls, state, **hparams):
        """Build a model and load a published PyTorch state dict into it.

        Args:
            state: mapping from PyTorch parameter names (``embedding.weight``,
                ``LGEBs.0.phi_e.0.weight``, ..., ``graph_dec.3.bias``; a ``module.``
                prefix is dropped) to arrays in PyTorch layout (``Linear.weight`` is
                ``[out, in]``; ``num_batches_tracked`` entries are accepted and unused).
            **hparams: constructor arguments. Published weights need
                ``readout="reference", arithmetic="reference"`` to reproduce the published
                logits; the defaults are kept so a caller chooses.

        Raises:
            ValueError: naming the first missing, unexpected or wrongly shaped tensor;
                nothing is loaded in that case.
        """
        model = cls(**hparams)
        state = _strip_prefix(state, "module.")
        targets = model._torch_targets()

        for name in state:
            if name not in targets and not name.endswith(".num_batches_tracked"):
                raise ValueError(f"LorentzNet: unexpected tensor {name!r} in the state dict")
        values = []
        for name, (variable, transpose) in targets.items():
            if name not in state:
                raise ValueError(f"LorentzNet: tensor {name!r} missing from the state dict")
            value = np.asarray(state[name])
            value = value.T if transpose else value
            if tuple(value.shape) != tuple(variable.shape):
                shape = np.asarray(state[name]).shape
                expected = tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)
                raise ValueError(
                    f"LorentzNet: tensor {name!r} has shape {shape}, expected {expected}"
                )
            values.append((variable, value))

        for variable, value in values:
            variable.assign(value.astype(variable.dtype))
        return model

    def _torch_targets(self):
        """PyTorch name -> (Keras variable, transpose) for every published tensor."""
        targets = {}

        def dense(prefix, layer):
            targets[f"{prefix}.weight"] = (layer.kernel, True)
            if layer.use_bias:
                targets[f"{prefix}.bias"] = (layer.bias, False)

        def norm(prefix, layer):
            targets[f"{prefix}.weight"] = (layer.gamma, False)
            targets[f"{prefix}.bias"] = (layer.beta, False)
            targets[f"{prefix}.running_mean"] = (layer.moving_mean, False)
            targets[f"{prefix}.running_var"] = (layer.moving_variance, False)

        dense("embedding", self.embedding)
        for index, block in enumerate(self.blocks):
            prefix = f"LGEBs.{index}"
            targets[f"{prefix}.phi_e.0.weight"] = (block.edge_kernel, True)
            norm(f"{prefix}.phi_e.1", block.edge_norm)
            dense(f"{prefix}.phi_e.3", block.message_dense)
            dense(f"{prefix}.phi_h.0", block.node_hidden)
            norm(f"{prefix}.phi_h.1", block.node_norm)
            dense(f"{prefix}.phi_h.3", block.node_out)
            if not block.last_block:
                dense(f"{prefix}.phi_x.0", block.coordinate_hidden)
                dense(f"{prefix}.phi_x.2", block.coordinate_out)
            dense(f"{prefix}.phi_m.0", block.gate_dense)
        dense("graph_dec.0", self.decoder_hidden)
        dense("graph_dec.3", self.decoder_out)
        return targets

    def get_config(self):
        return {
            **super().get_config(),
            "n_hidden": self.n_hidden,
            "n_layers": self.n_layers,
            "n_scalar": self.n_scalar,
            "c_weight": self.c_weight,
            "dropout": self.dropout,
            "n_classes": self.n_classes,
            "readout": self.readout,
            "beams": self.beams,
            "arithmetic": self.arithmetic,
            "jet_loop": self.jet_loop,
        }


def _strip_prefix(state, prefix):
    if state and all(name.startswith(prefix) for name in state):
        return {name[len(prefix) :]: value for name, value in state.items()}
    return dict(state)


def lorentznet_parity(npz_path, jit_compile=False, max_batches=None):
    """Compare the published LorentzNet logits stored in a fixture with this model's.

    Loads the fixture's ``w/<name>`` state dict with the published settings
    (``readout="reference", arithmetic="reference"``), runs its jets in its order in
    consecutive batches of ``batch_size``, padding batch ``k`` to
    ``padded_nodes[k] - 2`` constituents (the two beams make ``padded_nodes``), and
    compares with ``logits``.

    Args:
        npz_path: fixture with ``p4, logits, batch_size, padded_nodes, w/...``.
        jit_compile: run the forward pass with XLA.
        max_batches: compare only the first batches (all by default).

    Returns:
        ``{"median", "p99", "max"}`` of ``|delta logit| / (1 + |logit|)`` over all logits,
        ``"agreement"`` (fraction of jets with the same predicted class), ``"n_jets"``.
        Compare with ``PARITY_BOUNDS``.

    Raises:
        ValueError: a missing or malformed fixture field, named with the file.
    """
    import tensorflow as tf

    with np.load(npz_path) as fixture:
        fields = {name: fixture[name] for name in fixture.files}
    for name in ("p4", "logits", "batch_size", "padded_nodes"):
        if name not in fields:
            raise ValueError(f"{npz_path}: field {name!r} missing")
    p4, reference = fields["p4"].astype("float32"), fields["logits"]
    batch_size, padded_nodes = int(fields["batch_size"]), fields["padded_nodes"]
    n_jets = len(p4)
    if p4.ndim != 3 or p4.shape[-1] != 4 or reference.shape != (n_jets, 2):
        raise ValueError(
            f"{npz_path}: expected 'p4' [n, n_max, 4] and 'logits' [n, 2], "
            f"got {p4.shape} and {reference.shape}"
        )
    if len(padded_nodes) != -(-n_jets // batch_size):
        raise ValueError(
            f"{npz_path}: 'padded_nodes' has {len(padded_nodes)} entries for "
            f"{n_jets} jets in batches of {batch_size}"
        )
    state = {name[2:]: value for name, value in fields.items() if name.startswith("w/")}
    hparams = torch_hparams(state)
    model = LorentzNet.from_torch_state_dict(
        state, **hparams, readout="reference", arithmetic="reference"
    )

    forward = tf.function(
        lambda inputs: model(inputs, training=False),
        jit_compile=jit_compile,
        reduce_retracing=True,
    )
    padded_nodes = padded_nodes[:max_batches]
    n_jets = min(n_jets, len(padded_nodes) * batch_size)
    reference = reference[:n_jets]
    logits = []
    for index, n_nodes in enumerate(padded_nodes):
        batch = p4[index * batch_size : (index + 1) * batch_size, : int(n_nodes) - 2]
        mask = np.any(batch != 0, axis=-1)
        logits.append(forward({"p4": batch, "mask": mask}).numpy())
        logger.info("parity batch %d/%d done", index + 1, len(padded_nodes))
    logits = np.concatenate(logits)

    deviation = np.abs(logits - reference) / (1.0 + np.abs(reference))
    return {
        "median": float(np.median(deviation)),
        "p99": float(np.percentile(deviation, 99)),
        "max": float(np.max(deviation)),
        "agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
        "n_jets": int(n_jets),
    }


def torch_hparams(state):
    """Shape hyperparameters of a published state dict: ``n_hidden, n_scalar, n_layers,
    n_classes`` (``c_weight`` and ``dropout`` are not stored in it)."""
    state = _strip_prefix(state, "module.")
    if "embedding.weight" not in state or "graph_dec.3.weight" not in state:
        raise ValueError("LorentzNet: state dict lacks 'embedding.weight' or 'graph_dec.3.weight'")
    n_hidden, n_scalar = np.shape(state["embedding.weight"])
    blocks = {name.split(".")[1] for name in state if name.startswith("LGEBs.")}
    return {
        "n_hidden": int(n_hidden),
        "n_scalar": int(n_scalar),
        "n_layers": len(blocks),
        "n_classes": int(np.shape(state["graph_dec.3.weight"])[0]),
    }
