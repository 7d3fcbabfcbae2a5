"""Triton kernels of hrfast, installed as `hrfast.kernels` (importing this package imports triton)."""
