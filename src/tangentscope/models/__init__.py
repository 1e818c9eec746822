"""Small reference models used by the demo, the page, the tests and the experiments."""

from .embedding_mlp import EmbeddingMLP, EmbeddingMLPEnsemble
from .mlp import Sine, mlp
from .siren import Siren, pixel_grid, siren_init_
from .transformer import TinyTransformer

__all__ = ["EmbeddingMLP", "EmbeddingMLPEnsemble", "Sine", "Siren", "TinyTransformer", "mlp",
           "pixel_grid", "siren_init_"]
