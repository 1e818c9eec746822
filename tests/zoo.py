"""The shared test zoo: model settings (float64, eval mode) that both the kernel tests
(``test_entk.py``, ``test_structured.py``) and the statistics tests (``test_optim_stats.py``)
parametrize over, and the independent brute-force twins (one autograd call per example and
output).

:data:`ZOO` lists every setting with what the code under test is expected to make of it:
which parameters the structured eNTK leaves to the generic Jacobian path, and whether
:class:`~tangentscope.optim.PerExampleStats` has closed forms for all of its parameters.
:data:`MODELS` is the original five-model subset (``name -> builder``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tangentscope.models import TinyTransformer, mlp, resnet8x, resnet20


def make_mlp(p: int = 1, in_dim: int = 3, width: int = 16, act: str = "tanh") -> nn.Module:
    return mlp(in_dim, width, 2, p, activation=act).double()


class SmallCNN(nn.Module):
    def __init__(self, p: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, stride=2)
        self.fc = nn.Linear(3 * 2 * 2, p)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def make_cnn(p: int = 3) -> nn.Module:
    return SmallCNN(p).double()


def make_bn(p: int = 2) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, p)).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.eval()


def make_transformer(p: int = 5) -> nn.Module:
    return TinyTransformer(7, p, d_model=8, n_heads=2, n_layers=1, d_mlp=16, max_len=4).double()


class Convs(nn.Module):
    """Conv1d/2d with groups, dilation, stride, even kernels with 'same', reflect padding,
    GroupNorm, eval BatchNorm2d, a bias-free conv and an in-place ReLU on a recorded output."""

    def __init__(self, p=2):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 2, padding="same", groups=2, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.c = nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2)
        self.d = nn.Conv1d(6, 3, 2, padding="same")
        self.fc = nn.Linear(3 * 3 * 3, p)

    def forward(self, x):
        h = torch.tanh(self.bn(self.a(x)))
        h = F.relu(self.b(h), inplace=True)
        h = torch.tanh(self.c(self.gn(h)))
        h = torch.tanh(self.d(h.flatten(2)))
        return self.fc(h.flatten(1))


def make_convs(p: int = 2) -> nn.Module:
    model = Convs(p).double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def with_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 eval mode, every BatchNorm with random running statistics and
    affine parameters (so that eval BatchNorm is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g, dtype=torch.float64) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g, dtype=torch.float64))
                m.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                m.bias.copy_(0.4 * torch.rand(c, generator=g, dtype=torch.float64) - 0.2)
    return model.eval()


class PaddedConvs(nn.Module):
    """Grouped convolutions with every padding mode, 1-d and 2-d."""

    def __init__(self, p=2):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular", groups=2)
        self.b = nn.Conv2d(4, 6, (2, 3), padding=(1, 0), padding_mode="replicate", groups=2,
                           stride=(2, 1))
        self.c = nn.Conv1d(6, 4, 3, padding=1, padding_mode="reflect", groups=2)
        self.fc = nn.Linear(4 * 6, p)

    def forward(self, x):                                 # x: (n, 2, 4, 4)
        h = torch.tanh(self.b(torch.tanh(self.a(x))))    # (n, 6, 3, 2)
        h = torch.tanh(self.c(h.flatten(2)))              # (n, 4, 6)
        return self.fc(h.flatten(1))


class Tokens(nn.Module):
    """Embeddings with repeated tokens, padding_idx, two lookups and a 3-d token batch."""

    def __init__(self, p=3):
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.emb2 = nn.Embedding(6, 3, padding_idx=-1)
        self.norm = nn.RMSNorm(4)
        self.out = nn.Linear(4 + 3, p)

    def forward(self, t):
        h = self.norm(torch.tanh(self.emb(t))).mean(1)
        g = self.emb2(t.flip(1)).sum(1) + self.emb2(t[:, :2]).prod(1)  # emb2 called twice
        return self.out(torch.cat([h, g], -1))


class SeqModel(nn.Module):
    """Linear layers on ``(b, L, d)`` sequences, LayerNorm without bias, RMSNorm, a Conv1d."""

    def __init__(self, p=2):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1)
        self.ln = nn.LayerNorm(4, bias=False)
        self.fc = nn.Linear(4, 5)
        self.rms = nn.RMSNorm(5)
        self.out = nn.Linear(5, p)

    def forward(self, x):                                 # x: (b, 3, T)
        h = self.conv(x).transpose(1, 2)                  # (b, L, 4)
        h = torch.tanh(self.fc(self.ln(h)))
        return self.out(self.rms(h)).mean(1)


class Shared(nn.Module):
    """One Linear applied twice (recurrently), one tied across two modules, one on positions."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.rec = nn.Linear(5, 5)
        self.a = nn.Linear(5, 5, bias=False)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))                    # (n, 4, 5): 4 positions
        h = torch.tanh(self.rec(torch.tanh(self.rec(h))))
        h = self.b(torch.tanh(self.a(h)))
        return self.out(h.mean(1))


def inputs_for(name: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    if name == "transformer":
        return torch.randint(0, 7, (n, 4), generator=g)
    return torch.randn(n, 3, generator=g, dtype=torch.float64)


def _randn(*shape: int) -> Callable[[int, int], torch.Tensor]:
    def make(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return make


def _tokens(vocab: int, length: int) -> Callable[[int, int], torch.Tensor]:
    def make(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, vocab, (n, length), generator=g)
        t[0, 1] = t[0, 0]                                  # a repeated token
        return t
    return make


@dataclasses.dataclass(frozen=True)
class Setting:
    """One zoo entry.

    Attributes:
        name: its id in test names.
        build: a fresh float64 model in eval mode.
        inputs: ``inputs(n, seed)`` → ``n`` examples.
        generic: parameters the structured eNTK leaves to the generic Jacobian path.
        stats: whether :class:`PerExampleStats` has closed forms for every parameter.
        broadcast: ``PerExampleStats(broadcast=...)`` modules (called without a batch).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], torch.Tensor]
    generic: frozenset[str] = frozenset()
    stats: bool = True
    broadcast: tuple[str, ...] = ()


ZOO: list[Setting] = [
    Setting("mlp_p1", lambda: make_mlp(1), _randn(3)),
    Setting("mlp_p4", lambda: make_mlp(4), _randn(3)),
    Setting("cnn", lambda: make_cnn(3), _randn(1, 6, 6)),
    Setting("bn_eval", lambda: make_bn(2), _randn(3)),
    Setting("transformer", lambda: make_transformer(5), _tokens(7, 4),
            generic=frozenset({"pos.weight"}), broadcast=("pos",)),
    Setting("convs", make_convs, _randn(2, 6, 6)),
    Setting("padded_convs", lambda: PaddedConvs().double().eval(), _randn(2, 4, 4)),
    Setting("tokens", lambda: Tokens().double().eval(), _tokens(6, 4)),
    Setting("sequence", lambda: SeqModel().double().eval(), _randn(3, 9)),
    Setting("shared", lambda: Shared().double().eval(), _randn(4, 3)),
    # issue 16's ResNet (4 stages, projection shortcuts) and ResNet-20 (option-A shortcuts),
    # one block per stage, widths 2..16, on 3×8×8 inputs
    Setting("resnet8x", lambda: with_bn_stats(resnet8x(3, width=2, blocks=1)), _randn(3, 8, 8)),
    Setting("resnet20", lambda: with_bn_stats(resnet20(3, width=2, blocks=1)), _randn(3, 8, 8)),
]
"""Every setting (the transformer's position table is called without the batch dimension:
generic for the structured eNTK, ``broadcast=['pos']`` for the statistics)."""

SETTINGS = {s.name: s for s in ZOO}

MODELS = {
    "mlp_p1": lambda: make_mlp(1),
    "mlp_p4": lambda: make_mlp(4),
    "cnn": lambda: make_cnn(3),
    "bn_eval": lambda: make_bn(2),
    "transformer": lambda: make_transformer(5),
}


def kind(name: str) -> str:
    return "cnn" if name == "cnn" else "transformer" if name == "transformer" else "vec"


def brute_force_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, p, P)`` rows of the Jacobian, one ``torch.autograd.grad`` per (example, output)."""
    params = [q for q in model.parameters() if q.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per = []
        for a in range(out.shape[0]):
            gs = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per.append(torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                                  for q, g in zip(params, gs)]))
        rows.append(torch.stack(per))
    return torch.stack(rows)


def brute_force_entk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None,
                     d: torch.Tensor | None = None) -> torch.Tensor:
    """``(n1, n2, p, p)`` eNTK ``J1 diag(d) J2ᵀ`` from :func:`brute_force_jacobian`."""
    J1 = brute_force_jacobian(model, x1)
    J2 = J1 if x2 is None else brute_force_jacobian(model, x2)
    if d is not None:
        J1 = J1 * d
    return torch.einsum("iak,jbk->ijab", J1, J2)
