"""Pretraining models (ViT encoder, CapPa)."""
