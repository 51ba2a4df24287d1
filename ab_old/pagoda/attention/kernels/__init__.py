"""Triton kernels. Host logic (validation, planning, buffers) lives in the wrapper modules."""
