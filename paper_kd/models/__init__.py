"""Keras 3 models: the LorentzNet teacher and the Deep Set, PFN, EFN and MLP students.

Every model takes ``{"p4": [B, N, 4], "mask": [B, N]}`` and returns two logits
``[B, 2]`` (index 1 = top), as the published models do.
"""

__all__ = ["MODEL_NAMES", "build_model"]

MODEL_NAMES = ("lorentznet", "deepset", "pfn", "efn", "mlp")


def build_model(name, **hparams):
    """Build a model by name with its hyperparameters (keyword arguments of its class)."""
    from paper_kd.models.lorentznet import LorentzNet
    from paper_kd.models.students import MLP, DeepSet, EnergyFlowNetwork, ParticleFlowNetwork

    classes = {
        "lorentznet": LorentzNet,
        "deepset": DeepSet,
        "pfn": ParticleFlowNetwork,
        "efn": EnergyFlowNetwork,
        "mlp": MLP,
    }
    if name not in classes:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    return classes[name](**hparams)
