"""Every gift_quant import of the vLLM plugin, in one place (repoint here when modules move).

``mixed_linear_forward(x, layer)`` is the project's op: it takes any object with the checkpoint
attributes (qweight, qzeros, scales, g_idx, salient_idx, salient_weight, bias, bits, group_size,
in_features, out_features) and runs the Triton/C++ kernel on CUDA, the PyTorch path elsewhere.
"""
from ...config import QUANT_METHOD, GiftConfig  # noqa: F401
from ...config import is_excluded as skip_module  # noqa: F401  (the project's one modules_not_converted rule)
from ...errors import GiftError  # noqa: F401
from ...nn.dispatch import mixed_linear_forward  # noqa: F401
from ...core.packing import (  # noqa: F401
    pack_qweight,
    pack_qzeros,
    packed_len,
    unpack_qweight,
    unpack_qzeros,
)
from ...core.quantizer import SUPPORTED_BITS, n_groups  # noqa: F401
