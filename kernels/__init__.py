"""Triton kernels and their launchers (installed as ``trpl_fast.kernels``), and the CPU
kernels of the KL projection, full and diagonal (``kl_cpu.c``, built on first use and
launched through ctypes by ``kl_cpu.py``).

Only ``@triton.jit`` functions (and the C source) and thin ``launch_*`` functions live
here: each launcher takes contiguous (rows, d[, d]) tensors plus per-row bounds, picks the
grid and block sizes, launches and returns new tensors. The row launchers go through
``torch.library.wrap_triton`` (so the launch traces under ``torch.compile``; eager callers
turn it off), the fused full-KL launchers launch directly (only ever called on real
tensors). The value checks of ``validation.py`` are the one kernel that checks rather than
projects. No autograd, no RL.
"""
