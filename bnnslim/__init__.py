"""bnnslim: make binary neural networks small.

Binarize an ordinary PyTorch model, learn which filters to keep layer by layer
with the Main/Subsidiary method (Xu, Dong, Li, Su, CVPR 2019), slim the graph for
real and save it as safetensors.
"""

from __future__ import annotations

__version__ = "0.1.0"
