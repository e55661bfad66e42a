"""``torch.ops.trpl.*``: the projection operators (schemas, dispatch, autograd).

Importing this package registers, for each kind and covariance form, a forward op
``trpl::project_<kind>_<form>`` and its backward op ``trpl::project_<kind>_<form>_backward``
(see :class:`trpl_fast.ops._common.ProjectionOp` for the schema). Triton kernels are used
for CUDA tensors; vectorized torch everywhere else, compiled by inductor for large CPU
batches of the KL diagonal op (:func:`set_cpu_compile_min_elements`). Eager calls that the
Triton kernels take skip the dispatcher (``_eager``; :func:`set_eager_fast_path`).
"""

from ._common import in_torch_func_mode, torch_func_mode
from ._compiled_cpu import cpu_compile_min_elements, set_cpu_compile_min_elements
from ._eager import eager_fast_path_enabled, set_eager_fast_path
from .frobenius import FROB_DIAG, FROB_FULL
from .kl import KL_DIAG, KL_FULL
from .wasserstein import W2_DIAG, W2_FULL

OPS = {
    ("frob", "diag"): FROB_DIAG,
    ("frob", "full"): FROB_FULL,
    ("w2", "diag"): W2_DIAG,
    ("w2", "full"): W2_FULL,
    ("kl", "diag"): KL_DIAG,
    ("kl", "full"): KL_FULL,
}

__all__ = [
    "OPS",
    "cpu_compile_min_elements",
    "eager_fast_path_enabled",
    "in_torch_func_mode",
    "set_cpu_compile_min_elements",
    "set_eager_fast_path",
    "torch_func_mode",
]
