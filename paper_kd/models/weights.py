"""Published PyTorch weights into Keras models, and the ``paper-kd convert-weights`` command.

A PyTorch state dict is a mapping from dotted names to arrays (``Linear.weight``
is ``[out, in]``, the transpose of a Keras ``Dense`` kernel; BatchNorm keeps
``weight, bias, running_mean, running_var`` and a ``num_batches_tracked``
counter that Keras has no use for). ``assign_torch_state`` checks the whole
mapping against the model before it writes a single variable.

The command reads a released ``.pt`` checkpoint (needs PyTorch, an optional
extra) or an ``.npz`` state dict and writes Keras weights (``.weights.h5``) or
a full model (``.keras``).
"""

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["assign_torch_state", "convert_weights", "load_state_dict", "torch_state_dict"]

log = logging.getLogger(__name__)

# Buffers that PyTorch saves but that carry no weights of the model.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
# Prefixes added by training wrappers (DataParallel, Lightning, the published wrapper).
_WRAPPER_PREFIXES = ("module.", "model.", "student.")


def assign_torch_state(variables, state, model_name="model"):
    """Assign ``state`` to ``variables`` after checking every name and shape.

    Args:
        variables: list of ``(torch_name, keras_variable, transform)``; ``transform``
            (or None) maps the PyTorch array to the Keras layout.
        state: mapping of PyTorch names to arrays.
        model_name: used in error messages.

    Raises:
        ValueError: naming the first missing, unexpected or mis-shaped tensor; then
            no variable has been changed.
    """
    values = []
    expected = set()
    for name, variable, transform in variables:
        expected.add(name)
        if name not in state:
            raise ValueError(f"{model_name}: state dict has no tensor {name!r}")
        value = np.asarray(state[name])
        if transform is not None:
            value = transform(value)
        if tuple(value.shape) != tuple(variable.shape):
            shown = tuple(np.asarray(state[name]).shape)
            raise ValueError(
                f"{model_name}: tensor {name!r} has shape {shown}, the model expects "
                f"{tuple(variable.shape)} (in Keras layout)"
            )
        values.append((variable, value))

    for name in state:
        if name not in expected and not name.endswith(_IGNORED_SUFFIXES):
            raise ValueError(f"{model_name}: state dict has unexpected tensor {name!r}")

    for variable, value in values:
        variable.assign(value.astype(variable.dtype))
    log.debug("%s: loaded %d tensors", model_name, len(values))


def torch_state_dict(model):
    """The model's weights as a PyTorch-layout state dict ``{name: np.ndarray}``.

    The inverse of ``from_torch_state_dict`` for models with a published layout
    (every transform used there is a transpose, its own inverse).
    """
    if not model.built:
        model.build()
    return {
        name: (transform(np.asarray(variable)) if transform is not None else np.asarray(variable))
        for name, variable, transform in model._torch_variables()
    }


def _strip_prefixes(state):
    """Remove wrapper prefixes that every key shares."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def load_state_dict(path, prefix=""):
    """A state dict as ``{name: np.ndarray}`` from a ``.pt`` checkpoint or an ``.npz`` file.

    ``prefix`` selects the keys under it (e.g. ``"deepset/w/"`` in a fixture) and
    drops it from the names. Wrapper prefixes shared by every key are removed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
    elif path.suffix in (".pt", ".pth", ".ckpt"):
        state = _load_torch(path)
    else:
        raise ValueError(f"{path}: weights must be a .pt/.pth/.ckpt checkpoint or an .npz file")

    if prefix:
        state = {
            key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
        }
        if not state:
            raise ValueError(f"{path}: no tensor under prefix {prefix!r}")
    return _strip_prefixes(state)


def _load_torch(path):
    try:
        import torch
    except ImportError as error:
        raise ValueError(
            f"{path}: reading a PyTorch checkpoint needs PyTorch "
            "(pip install 'paper-kd[torch]'), or convert it to .npz elsewhere"
        ) from error
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(checkpoint).__name__}")
    return {key: value.detach().cpu().numpy() for key, value in checkpoint.items()}


def _model_class(name):
    from paper_kd.models.students import MLP, DeepSet

    if name == "lorentznet":
        from paper_kd.models.lorentznet import LorentzNet

        return LorentzNet
    classes = {"deepset": DeepSet, "mlp": MLP}
    if name not in classes:
        raise ValueError(f"--model must be one of deepset, mlp, lorentznet; got {name!r}")
    return classes[name]


def convert_weights(source, output, model_name, prefix="", hparams=None):
    """Convert a PyTorch state dict file to Keras weights or a ``.keras`` model.

    ``output`` ending in ``.weights.h5`` gets the weights only; ``.keras`` the full
    model. The file is written to a temporary name and renamed. Returns the model.
    """
    output = Path(output)
    if not (output.name.endswith(".weights.h5") or output.suffix == ".keras"):
        raise ValueError(f"{output}: output must end in .weights.h5 or .keras")
    state = load_state_dict(source, prefix=prefix)
    model = _model_class(model_name).from_torch_state_dict(state, **(hparams or {}))

    output.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".weights.h5" if output.name.endswith(".weights.h5") else ".keras"
    handle, temporary = tempfile.mkstemp(dir=output.parent, suffix=suffix)
    os.close(handle)
    try:
        if suffix == ".keras":
            model.save(temporary)
        else:
            model.save_weights(temporary)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    log.info("wrote %s (%s, %d parameters)", output, model_name, model.count_params())
    return model


def _parse_hparam(text):
    if "=" not in text:
        raise ValueError(f"--hparam must be KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def add_arguments(parser):
    parser.add_argument("source", help="PyTorch checkpoint (.pt) or state dict (.npz)")
    parser.add_argument("output", help="Keras weights (.weights.h5) or model (.keras)")
    parser.add_argument(
        "--model", default="deepset", help="deepset, mlp or lorentznet (default deepset)"
    )
    parser.add_argument(
        "--prefix", default="", help="take the keys under this prefix, e.g. deepset/w/"
    )
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model hyperparameter (repeatable); published defaults otherwise",
    )


def main(args):
    hparams = dict(_parse_hparam(text) for text in args.hparam)
    model = convert_weights(args.source, args.output, args.model, args.prefix, hparams)
    print(f"{args.output}: {args.model}, {model.count_params()} parameters")
    return 0
