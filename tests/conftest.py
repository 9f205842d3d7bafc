"""Fixtures shared by the test files: a small real Pythia dataset, the shared fixtures folder."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small but real: enough jets for a mass peak and a few batches; ~30 s on two idle cores.
PYTHIA_JETS = {"train": 200, "val": 100, "test": 100}
PYTHIA_SEED = 12345
# A pT-hat cut near the window gives several times more window jets per event than the
# package's default cuts; it removes 14-21 % of the jets in the lowest 25-GeV pT bin
# (4-10 % in the highest), a sculpting no test of the fixture depends on.
PYTHIA_PT_HAT_MIN = 450.0


@pytest.fixture(scope="session")
def pythia_jets_dir(tmp_path_factory):
    """A generated dataset folder (``train.h5``, ``val.h5``, ``test.h5``), made once per session.

    Balanced top/QCD jets from Pythia 8 + FastJet with the package's recipe
    (n_max = 200) except a pT-hat cut of ``PYTHIA_PT_HAT_MIN`` for speed,
    split sizes in ``PYTHIA_JETS``. Read-only: copy it before changing anything.
    """
    from paper_kd.data.generate import generate_dataset

    out_dir = tmp_path_factory.mktemp("pythia_jets")
    return generate_dataset(
        out_dir,
        PYTHIA_JETS,
        seed=PYTHIA_SEED,
        workers=2,
        shard_jets=60,
        progress=False,
        pt_hat_min=PYTHIA_PT_HAT_MIN,
    )


@pytest.fixture(scope="session")
def shared_fixtures():
    """The shared fixtures folder (published models, logits); skips the test where absent."""
    default = REPO.parent / "shared"
    path = Path(os.environ.get("PAPER_KD_SHARED", default)) / "fixtures"
    if not path.is_dir():
        pytest.skip(f"shared fixtures not found at {path} (set PAPER_KD_SHARED to the folder)")
    return path
