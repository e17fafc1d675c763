"""Datasets: the IDX reader, the bundled Fashion-MNIST subset and the built-in builders.

The hook that offers them lives in :mod:`bnnslim.default_plugins.datasets`.
"""
