"""Autoregressive image generators: raster GPT, VAR next-scale, FlowAR scale-wise flow matching."""
