"""Triton kernels of the serving ops (host logic lives in pagoda/ops/*.py)."""
