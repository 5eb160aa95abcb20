"""ownlm: own your language model. `ownlm.load(ref)` gives a model you can `generate` with and `chat` with."""

from .engine.generate import Completion
from .errors import OwnlmError
from .loading import LoadedModel, load

__version__ = "0.1.0"
__all__ = ["load", "LoadedModel", "Completion", "OwnlmError", "__version__"]
