"""Triton kernels and their launchers (installed as ``trpl_fast.kernels``), and the CPU
kernel of the full-covariance KL projection (``kl_cpu.c``, built on first use and
launched through ctypes by ``kl_cpu.py``).

Only ``@triton.jit`` functions and thin ``launch_*`` functions live here: each launcher
takes contiguous 2-D (rows, d) tensors plus per-row bounds, picks the grid and block sizes,
launches through ``torch.library.wrap_triton`` (so the launch traces under
``torch.compile``) and returns new tensors. No autograd, no validation, no RL.
"""
