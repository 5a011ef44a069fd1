"""Loaders for the model files users already have (one module per kind of file)."""
