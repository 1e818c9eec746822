"""Small reference models used by the demo, the page, the tests and the experiments."""

from .mlp import Sine, mlp
from .transformer import TinyTransformer

__all__ = ["Sine", "TinyTransformer", "mlp"]
