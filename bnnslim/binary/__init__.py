"""Binary layers, the straight-through estimators they use, and model conversion."""
