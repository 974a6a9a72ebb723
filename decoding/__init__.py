"""Decoding methods: the plain reference sampler and its accelerations."""
