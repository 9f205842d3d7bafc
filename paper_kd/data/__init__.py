"""Jet datasets: generation with Pythia 8 and FastJet, readers, the canonical format."""
