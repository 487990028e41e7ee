"""Adapters that turn models trained by other libraries into gapbench's (model, encoder) pair."""
