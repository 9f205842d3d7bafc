"""Keras 3 models: the LorentzNet teacher and the Deep Set, PFN, EFN and MLP students."""
