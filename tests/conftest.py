"""Test setup. Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors:
``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import trpl_fast  # noqa: E402,F401  (registers torch.ops.trpl)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
