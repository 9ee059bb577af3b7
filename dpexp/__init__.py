"""dpexp: differentially private deep learning experiments on Lightning, Opacus and Hydra."""

__version__ = "0.1.0"
