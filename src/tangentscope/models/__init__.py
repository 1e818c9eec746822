"""Small reference models used by the page, the tests and the experiments."""

from .embedding_mlp import EmbeddingMLP, EmbeddingMLPEnsemble
from .ensemble import StackedEnsemble
from .mlp import Sine, mlp
from .random_features import random_features
from .siren import Siren, pixel_grid, siren_init_
from .transformer import TinyTransformer

__all__ = ["EmbeddingMLP", "EmbeddingMLPEnsemble", "Sine", "Siren", "StackedEnsemble",
           "TinyTransformer", "mlp", "pixel_grid", "random_features", "siren_init_"]
