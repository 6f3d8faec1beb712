"""Triton kernels, installed as ``trimix_probe.kernels`` (never as a top-level ``kernels``)."""
