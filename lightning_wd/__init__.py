"""lightning_wd: weight decay done right for PyTorch Lightning.

Declarative decay rules resolved over any model into a checked, explainable plan
(:class:`DecayRule`, :mod:`presets`, :class:`DecayPlan`, :func:`build_param_groups`),
a ``LightningModule`` mixin that turns the plan into ``configure_optimizers``
(:class:`WDMixin`), and a callback that applies decoupled, lr-independent, relative,
L1 or cautious decay after every real optimizer step (:class:`WeightDecayCallback`).
"""

from lightning_wd import functional, presets, schedules
from lightning_wd.callback import WeightDecayCallback
from lightning_wd.mixin import WDMixin
from lightning_wd.plan import DecayPlan, PlanError, build_param_groups
from lightning_wd.rules import DecayRule

__version__ = "0.1.0"

__all__ = [
    "DecayPlan",
    "DecayRule",
    "PlanError",
    "WDMixin",
    "WeightDecayCallback",
    "__version__",
    "build_param_groups",
    "functional",
    "presets",
    "schedules",
]
