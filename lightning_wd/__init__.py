"""lightning_wd: weight decay done right for PyTorch Lightning.

Declarative decay rules resolved over any model into a checked, explainable plan
(``DecayRule``, ``presets``, ``DecayPlan``, ``build_param_groups``),
a ``LightningModule`` mixin that turns the plan into ``configure_optimizers``
(``WDMixin``), and a callback that applies decoupled, lr-independent, relative,
L1 or cautious decay after every real step of any torch optimizer (``WeightDecay``), and
its Lightning adapter (``WeightDecayCallback``). Plain PyTorch use never imports Lightning.
"""

from typing import TYPE_CHECKING, Any

import torch

from lightning_wd import functional, presets, schedules
from lightning_wd.engine import WeightDecay
from lightning_wd.plan import DecayPlan, PlanError, build_param_groups
from lightning_wd.rules import DecayRule
from lightning_wd.schedules import weight_decay_from_timescale

if TYPE_CHECKING:
    from lightning_wd.callback import WeightDecayCallback
    from lightning_wd.mixin import OptimizerSpec, WDMixin

#: The Lightning shell, imported on first use, so that plain PyTorch use never imports Lightning.
_LIGHTNING_NAMES = {
    "OptimizerSpec": "lightning_wd.mixin",
    "WDMixin": "lightning_wd.mixin",
    "WeightDecayCallback": "lightning_wd.callback",
}


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_wd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


# Rules saved with a module's hyper-parameters (`save_hyperparameters()` with a `decay_rules` argument)
# must load under `torch.load(weights_only=True)`, Lightning's default: the rule class (validated again
# on unpickling) and the preset predicates (pure functions) are safe to allow.
torch.serialization.add_safe_globals(
    [DecayRule, presets.is_bias, presets.is_embedding, presets.is_linear_weight, presets.is_normalization]
)

__version__ = "0.1.0"

__all__ = [
    "DecayPlan",
    "DecayRule",
    "OptimizerSpec",
    "PlanError",
    "WDMixin",
    "WeightDecay",
    "WeightDecayCallback",
    "__version__",
    "build_param_groups",
    "functional",
    "presets",
    "schedules",
    "weight_decay_from_timescale",
]
