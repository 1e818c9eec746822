"""Small reference models used by the page, the tests and the experiments."""

from .embedding_mlp import EmbeddingMLP, EmbeddingMLPEnsemble
from .ensemble import StackedEnsemble
from .mlp import Sine, mlp
from .random_features import random_features
from .resnet import BasicBlock, ResNet, resnet8x, resnet20
from .siren import Siren, pixel_grid, siren_init_
from .transformer import TinyTransformer

__all__ = ["BasicBlock", "EmbeddingMLP", "EmbeddingMLPEnsemble", "ResNet", "Sine", "Siren",
           "StackedEnsemble", "TinyTransformer", "mlp", "pixel_grid", "random_features",
           "resnet20", "resnet8x", "siren_init_"]
