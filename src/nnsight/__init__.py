"""nnsight: read and write any activation of a PyTorch model while it runs.

    from nnsight import NNsight
    model = NNsight(net)
    with model.trace(x):
        hidden = model.layer1.output.save()
"""

from .config import CONFIG
from .tracing.envoy import Envoy
from .modeling.base import NNsight
from .modeling.language import LanguageModel
from .modeling.diffusion import DiffusionModel
from .modeling.vision_language import VisionLanguageModel
from .modeling.transformers import TransformersModel
from .tracing.errors import InvokeError, MissedValueError, NNsightDeprecationWarning, NNsightError, NotInTraceError, OutOfOrderError
from .tracing.tracer import save
from .ndif import compare, get_local_env, is_model_running, ndif_status, register, status  # ndif_status: deprecated

__version__ = "0.1.0"

__all__ = [
    "NNsight",
    "CONFIG",
    "LanguageModel",
    "DiffusionModel",
    "VisionLanguageModel",
    "TransformersModel",
    "Envoy",
    "save",
    "InvokeError",
    "NNsightError",
    "OutOfOrderError",
    "MissedValueError",
    "NotInTraceError",
    "NNsightDeprecationWarning",
    "register",
    "status",
    "is_model_running",
    "get_local_env",
    "compare",
    "__version__",
]
