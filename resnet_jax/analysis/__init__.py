"""Reproductions of the papers' analyses: degradation (Fig. 1, Fig. 6, Table 6), layer
responses (Fig. 7), the gradient through the identity path, and Table 1.

Each analysis is a library function returning plain Python numbers (JSON-ready); the
figures are drawn from those numbers by :mod:`resnet_jax.analysis.plots` (matplotlib, the
``[plots]`` extra, imported only when a figure is drawn). The command line is
``python -m resnet_jax.experiments``. models/ and train/ never import this package.
"""
