"""Model size: parameters and multiply-accumulates (MACs) per jet, for the size table.

Convention (the same for every architecture, so rows compare):

- ``parameters``: trainable weights (kernels, biases, BatchNorm scale and
  offset), as PyTorch's ``parameters()`` counts them; BatchNorm running
  statistics are buffers and are not counted.
- ``macs_per_jet``: one MAC per multiply-accumulate of every dense layer
  (``n_in * n_out`` per row it is applied to), plus one per element of a
  pooling sum over constituents (``n_constituents * latent``). Layers are
  counted where the model runs them: the Deep Set applies the last Linear of
  ``phi`` after the pooling (it commutes with the sum), once per jet. Biases,
  activations, BatchNorm (an affine map at inference), feature computation and
  elementwise products are not counted: they are a few percent at most.
- A jet has ``n_constituents`` real constituents (57 by default, about the mean
  multiplicity of the top-tagging dataset); padding is not counted.
  LorentzNet runs on ``N + 2`` nodes (two beams) and ``(N + 2)(N + 1)`` directed
  edges of its complete graph without self-loops; per-edge layers count once per
  edge and per-node layers once per node. Its first edge layer, on
  ``[h_i, h_j, norm_ij, dot_ij]``, runs split: ``h W_a`` and ``h W_b`` once per
  node, the two invariants per edge (``LorentzEquivariantBlock``), and is counted
  so. The MLP reads a fixed number of slots, so its count does not depend on the
  multiplicity.
"""

import numpy as np

__all__ = ["model_size", "size_table"]


def _chain_macs(sizes):
    """MACs of dense layers ``sizes[0] -> sizes[1] -> ...`` applied to one row."""
    return sum(int(a) * int(b) for a, b in zip(sizes[:-1], sizes[1:]))


def _parameters(model):
    if not model.built:
        model.build()
    return int(sum(np.prod(variable.shape) for variable in model.trainable_weights))


def _lorentznet_macs(config, n_constituents):
    hidden, n_scalar = config["n_hidden"], config["n_scalar"]
    nodes = n_constituents + (2 if config.get("beams", True) else 0)
    edges = nodes * (nodes - 1)

    macs = nodes * n_scalar * hidden  # embedding
    # phi_e's first Linear split: invariants per edge, node pieces per node; then phi_m.
    edge_message = 2 * hidden + hidden * hidden + hidden
    coordinate = hidden * hidden + hidden  # phi_x
    node_update = 2 * hidden * hidden  # phi_e's first Linear on h_i and on h_j
    node_update += (2 * hidden + n_scalar) * hidden + hidden * hidden  # phi_h
    for layer in range(config["n_layers"]):
        last = layer == config["n_layers"] - 1
        macs += edges * (edge_message + (0 if last else coordinate)) + nodes * node_update
    return macs + hidden * hidden + hidden * config["n_classes"]  # decoder


def _macs(model, n):
    from paper_kd.models.students import MLP, DeepSet, EnergyFlowNetwork, ParticleFlowNetwork

    config = model.get_config()
    if isinstance(model, DeepSet):
        width, latent, depth = config["width"], config["latent"], config["depth"]
        # The last Linear of phi runs after the pooling, once per jet (see DeepSet).
        phi = [4] + [width] * (depth - 1)
        rho = [latent] + [width] * (depth - 1) + [config["n_classes"]]
        return n * _chain_macs(phi) + n * phi[-1] + phi[-1] * latent + _chain_macs(rho)
    if isinstance(model, MLP):
        inputs = config["n_constituents"] * config["n_features"]
        sizes = [inputs] + [config["width"]] * (config["depth"] - 1) + [config["n_classes"]]
        return _chain_macs(sizes)
    if isinstance(model, ParticleFlowNetwork | EnergyFlowNetwork):
        n_inputs = 4 if isinstance(model, ParticleFlowNetwork) else 2
        phi = [n_inputs, *config["phi_sizes"]]
        f = [config["phi_sizes"][-1], *config["f_sizes"], config["n_classes"]]
        return n * _chain_macs(phi) + n * phi[-1] + _chain_macs(f)
    if type(model).__name__ == "LorentzNet":
        return _lorentznet_macs(config, n)
    raise ValueError(f"model_size: no MAC count for {type(model).__name__}")


def model_size(model, n_constituents=57):
    """``{"parameters": int, "macs_per_jet": int}`` of a model (convention: module docstring).

    Example:
        >>> model_size(DeepSet(), n_constituents=57)["parameters"]
        68226
    """
    if n_constituents < 1:
        raise ValueError(f"model_size: n_constituents must be >= 1, got {n_constituents}")
    return {"parameters": _parameters(model), "macs_per_jet": int(_macs(model, n_constituents))}


def size_table(models, n_constituents=57):
    """Rows ``{"model", "parameters", "macs_per_jet", "n_constituents"}`` for a dict of models.

    The rows keep the dict's order; the reproduce scripts print them as a table.
    """
    return [
        {"model": name, **model_size(model, n_constituents), "n_constituents": n_constituents}
        for name, model in models.items()
    ]
