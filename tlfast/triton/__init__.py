"""Triton kernels, one file per op; import the op's module directly."""
