"""Evaluation: FID with the standard Inception network (offline), reconstruction metrics, codebook statistics."""
