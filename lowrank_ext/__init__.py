"""lowrank_ext: fused low-rank linear layers for PyTorch.

    >>> import lowrank_ext as lx
    >>> B, A = lx.svd_truncate(W, rank=16)       # W ≈ B·A
    >>> y = lx.lowrank_linear(x, A, B, bias)     # (x·Aᵀ)·Bᵀ + bias, fused

The ops are registered with the PyTorch dispatcher as ``torch.ops.lowrank_ext.*``
(compiled C++/CUDA kernels when ``lowrank_ext._C`` is built, a pure-torch
fallback otherwise); see :func:`backend_info`.

On top of the ops: ``LowRankLinear`` and ``LoRALinear`` modules,
``compress_model`` (whole-model compression, optionally activation-aware),
``distill`` (end-to-end refinement of the factors against the original model),
``save_compressed`` / ``load_compressed``, and LoRA over a whole model
(``add_lora``, ``lora_state_dict``, ``load_lora_state_dict``, ``merge_lora``).
"""

from ._version import __version__
from . import _backend  # loads the compiled kernels first
from . import _library  # noqa: F401  (defines the ops)
from .info import backend_info
from .ops import lora_linear, lowrank_linear
from .svd import choose_rank, svd_truncate
from .lora_layer import LoRALinear
from .nn import LowRankLinear
from .attention import SplitMultiheadAttention, split_attention
from .compress import compress_model
from .distill import DistillResult, distill
from .export import decompositions
from .lora import add_lora, disable_lora, load_lora_state_dict, lora_state_dict, merge_lora
from .peft_compat import from_peft, save_peft_adapter
from .report import CompressionReport, LayerReport
from .serialization import load_compressed, save_compressed

__all__ = [
    "CompressionReport",
    "DistillResult",
    "LayerReport",
    "LoRALinear",
    "LowRankLinear",
    "SplitMultiheadAttention",
    "__version__",
    "add_lora",
    "backend_info",
    "choose_rank",
    "compress_model",
    "decompositions",
    "disable_lora",
    "distill",
    "from_peft",
    "load_compressed",
    "load_lora_state_dict",
    "lora_linear",
    "lora_state_dict",
    "lowrank_linear",
    "merge_lora",
    "save_compressed",
    "save_peft_adapter",
    "split_attention",
    "svd_truncate",
]
