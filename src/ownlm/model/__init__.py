from .config import ModelConfig, RopeScaling
from .transformer import Transformer

__all__ = ["ModelConfig", "RopeScaling", "Transformer"]
