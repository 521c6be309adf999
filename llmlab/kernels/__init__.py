"""Triton kernels, each beside its plain-torch reference, behind one dispatch point.

Taught in notebook 13 (Triton kernels).  Every public function here runs either
the Triton kernel (compiled on CUDA, or Triton's interpreter on CPU) or the
plain-torch reference it must equal; :mod:`llmlab.kernels.dispatch` decides
(``backend=``, ``use_backend(...)``, ``LLMLAB_KERNELS``, ``TRITON_INTERPRET=1``).
Without Triton installed the package still imports and the references run.

(``llmlab.kernels.softmax`` and friends are the *functions*; their modules, with
the kernels themselves, are imported by full name: ``from llmlab.kernels.softmax
import softmax_kernel``.  ``llmlab.kernels.dispatch`` is the module.)

- :func:`vector_add` — programs, blocks, masks, the grid;
- :func:`softmax` — a fused row softmax, one program per row;
- :func:`store_kvcache` — new K/V into the paged pool through a slot mapping;
- :func:`paged_decode_attention` — decode attention over block tables, GQA-aware;
- :func:`flash_attention` — tiled prefill attention with an online softmax.
"""

from llmlab.kernels.dispatch import (
    BACKENDS,
    KERNELS_ENV,
    KernelError,
    KernelUnavailableError,
    backend_for,
    interpret_requested,
    requested_backend,
    triton_importable,
    use_backend,
)
from llmlab.kernels.flash_attention import (
    flash_attention,
    flash_attention_hbm_bytes,
    flash_attention_reference,
    standard_attention_hbm_bytes,
)
from llmlab.kernels.kv_store import store_kvcache, store_kvcache_bytes, store_kvcache_reference
from llmlab.kernels.paged_decode import paged_decode_attention, paged_decode_hbm_bytes, paged_decode_reference
from llmlab.kernels.softmax import softmax, softmax_bytes, softmax_eager_bytes, softmax_reference
from llmlab.kernels.vector_add import vector_add, vector_add_bytes, vector_add_reference

__all__ = [
    "BACKENDS",
    "KERNELS_ENV",
    "KernelError",
    "KernelUnavailableError",
    "backend_for",
    "flash_attention",
    "flash_attention_hbm_bytes",
    "flash_attention_reference",
    "interpret_requested",
    "paged_decode_attention",
    "paged_decode_hbm_bytes",
    "paged_decode_reference",
    "requested_backend",
    "softmax",
    "softmax_bytes",
    "softmax_eager_bytes",
    "softmax_reference",
    "standard_attention_hbm_bytes",
    "store_kvcache",
    "store_kvcache_bytes",
    "store_kvcache_reference",
    "triton_importable",
    "use_backend",
    "vector_add",
    "vector_add_bytes",
    "vector_add_reference",
]
