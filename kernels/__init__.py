"""Triton kernels of dualdiff, shipped in the wheel as ``dualdiff.kernels``.

One module per fused op; each holds the ``@triton.jit`` kernels and their host launchers.
Import only through ``dualdiff.ops`` (this package needs triton).
"""
