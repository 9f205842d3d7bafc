"""paper-kd: knowledge distillation for efficient and Lorentz-robust jet tagging.

Reproduces and extends Liu, Gandrakota, Ngadiuba, Spiropulu and Vlimant,
"Efficient and Robust Jet Tagging at the LHC with Knowledge Distillation"
(arXiv:2311.14160): a Lorentz-equivariant LorentzNet teacher distilled into
Deep Set and MLP students, in Keras 3 on the TensorFlow backend.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
