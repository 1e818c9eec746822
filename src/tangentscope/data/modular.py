"""Modular arithmetic tables ``c = a ∘ b (mod p)`` — the grokking tasks of Power et al. (2022).

Every pair ``(a, b)`` of the table is one example, listed in a fixed order (``a`` major, the
same for every seed); a seed only chooses the train/validation split. Tokens are the residues
``0 … p−1``; the optional ``'='`` token is ``p`` (so a transformer's vocabulary is ``p + 1``).

Operations (``op=``, by name or symbol):

==========  ===============================  ====================================
name        ``c``                            pairs
==========  ===============================  ====================================
``add``     ``a + b``  (``+``)               all ``p²``
``sub``     ``a − b``  (``-``)               all ``p²``  (non-commutative)
``mul``     ``a · b``  (``*``)               all ``p²``
``div``     ``a · b⁻¹`` (``/``)              ``b ≠ 0``: ``p(p−1)``; ``p`` prime
``sq_sum``  ``a² + b²``                      all ``p²``
``quad``    ``a² + ab + b²``                 all ``p²``
``quad_a``  ``a² + ab + b² + a``             all ``p²``  (non-commutative)
``cube_ab`` ``a³ + ab``                      all ``p²``  (non-commutative)
``div_odd`` ``a / b`` if ``b`` odd else      all ``p²``  (non-commutative); ``p`` prime
            ``a − b``
==========  ===============================  ====================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["ModularArithmetic", "modular_arithmetic", "OPERATIONS"]


def _inv(b: Tensor, p: int) -> Tensor:
    return torch.tensor([pow(int(v), -1, p) if int(v) % p else 0 for v in b], dtype=torch.long)


_OPS: dict[str, tuple[Callable[[Tensor, Tensor, int], Tensor], bool, bool]] = {
    # name: (c(a, b, p), needs b != 0, needs p prime)
    "add": (lambda a, b, p: a + b, False, False),
    "sub": (lambda a, b, p: a - b, False, False),
    "mul": (lambda a, b, p: a * b, False, False),
    "div": (lambda a, b, p: a * _inv(b, p), True, True),
    "sq_sum": (lambda a, b, p: a * a + b * b, False, False),
    "quad": (lambda a, b, p: a * a + a * b + b * b, False, False),
    "quad_a": (lambda a, b, p: a * a + a * b + b * b + a, False, False),
    "cube_ab": (lambda a, b, p: a ** 3 + a * b, False, False),
    "div_odd": (lambda a, b, p: torch.where(b % 2 == 1, a * _inv(b, p), a - b), False, True),
}
_SYMBOLS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
OPERATIONS: tuple[str, ...] = tuple(_OPS)


@dataclasses.dataclass(frozen=True)
class ModularArithmetic:
    """One modular-arithmetic table and a train/validation split.

    Attributes:
        x: ``(N, 2)`` (or ``(N, 3)`` with ``'='``) long tokens ``[a, b(, p)]``, every pair of
            the table in a fixed order (independent of the seed).
        y: ``(N,)`` long labels ``c ∈ [0, p)``.
        train_idx, val_idx: long indices into ``x``/``y`` (disjoint, covering all ``N``).
        p: the modulus; op: the operation's name.
    """

    x: Tensor
    y: Tensor
    train_idx: Tensor
    val_idx: Tensor
    p: int
    op: str

    @property
    def vocab(self) -> int:
        """Token count: ``p``, or ``p + 1`` with the ``'='`` token."""
        return self.p + (1 if self.x.shape[1] == 3 else 0)

    @property
    def x_train(self) -> Tensor:
        return self.x[self.train_idx]

    @property
    def y_train(self) -> Tensor:
        return self.y[self.train_idx]

    @property
    def x_val(self) -> Tensor:
        return self.x[self.val_idx]

    @property
    def y_val(self) -> Tensor:
        return self.y[self.val_idx]


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % k for k in range(2, int(p ** 0.5) + 1))


def modular_arithmetic(p: int = 97, op: str = "add", train_fraction: float = 0.5, *,
                       seed: int = 0, equals_token: bool = False) -> ModularArithmetic:
    """The table of ``a ∘ b mod p`` split at random into train and validation.

    Args:
        p: modulus (≥ 2; a prime for ``div`` and ``div_odd``).
        op: an operation name or symbol (module docstring).
        train_fraction: fraction of the pairs used for training, in ``(0, 1)`` (at least one
            example on each side).
        seed: seed of the split (the table itself does not depend on it).
        equals_token: append the ``'='`` token (id ``p``): ``x`` is ``(N, 3)``.

    Raises:
        ConfigError: unknown op, bad ``p`` or ``train_fraction``.
    """
    name = _SYMBOLS.get(op, op)
    if name not in _OPS:
        raise ConfigError(f"unknown op {op!r}; one of {', '.join(OPERATIONS)} (or + - * /)")
    fn, nonzero_b, prime = _OPS[name]
    if not isinstance(p, int) or p < 2:
        raise ConfigError(f"p must be an integer >= 2, got {p!r}")
    if prime and not _is_prime(p):
        raise ConfigError(f"op {name!r} needs a prime modulus (inverses mod p), got p={p}")
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(1 if nonzero_b else 0, p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    y = fn(a, b, p) % p
    cols = [a, b] + ([torch.full_like(a, p)] if equals_token else [])
    x = torch.stack(cols, 1)
    n = x.shape[0]
    n_train = min(max(int(round(train_fraction * n)), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return ModularArithmetic(x, y, perm[:n_train].sort().values, perm[n_train:].sort().values,
                             p, name)
