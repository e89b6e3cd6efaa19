"""torchsgd8: torch.optim.SGD semantics in fused custom ops, with optional 8-bit blockwise momentum."""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the torchsgd8 ops with the dispatcher)
from . import ops
from ._state import to_bitsandbytes_state_dict, to_torch_state_dict
from .optim import SGD, SGD8bit, SGD32bit

__version__ = "0.1.0"
__all__ = ["SGD", "SGD8bit", "SGD32bit", "ops", "to_bitsandbytes_state_dict", "to_torch_state_dict",
           "__version__"]
