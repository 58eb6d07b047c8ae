"""Triton SGMV/BGMV LoRA kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1).

One kernel family serves prefill and decode: rows are grouped by adapter slot (segments for SGMV, tokens sorted by
slot for BGMV, see kvrun.punica.metadata) and each program handles one tile of rows of one adapter, so an adapter's
weights are read once per tile rather than once per token. Semantics: kvrun.punica.ref. Imported only by
`select_ops` on CUDA, since it needs the triton package.
"""

from __future__ import annotations

from kvrun.punica import LoRAOps
from kvrun.punica.triton.ops import bgmv_expand, bgmv_shrink, expand, sgmv_expand, sgmv_shrink, shrink

TRITON_OPS = LoRAOps("triton", sgmv_shrink, sgmv_expand, bgmv_shrink, bgmv_expand)

__all__ = ["TRITON_OPS", "expand", "shrink"]
