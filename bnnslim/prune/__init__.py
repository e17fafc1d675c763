"""Filter pruning of binary networks: prunable groups, subsidiary selectors,
budgets, selection strategies and the layer-wise schedule of Xu et al. (CVPR 2019)."""
