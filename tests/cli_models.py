"""Models for the ``lightning-wd explain`` tests, imported by file path (``tests/cli_models.py:Net``)."""

from __future__ import annotations

import torch
from torch import nn

import lightning_wd as lwd


class RMSNorm(nn.Module):
    """A custom normalization layer that subclasses no torch norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Net(nn.Module):
    """Token embedding tied to the head, custom RMSNorm, one projection with a bias."""

    def __init__(self, width: int = 8, vocab: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


class WithRules(Net):
    """A model that carries its own rules (as a ``WDMixin`` model does)."""

    decay_rules = [lwd.DecayRule("everything", 0.3)]


#: A rule list for ``--rules tests/cli_models.py:RULES``.
RULES = [lwd.DecayRule("matrices", 0.2, min_ndim=2), lwd.DecayRule("vectors", 0.0, max_ndim=1)]


def rules(weight_decay: float = 0.5) -> list[lwd.DecayRule]:
    """A rule factory for ``--rules tests/cli_models.py:rules --weight-decay X``."""
    return [lwd.DecayRule("all", weight_decay)]
