"""Declarative decay rules: which parameters get which weight decay.

A ``DecayRule`` is a frozen, validated description of a set of parameters
(by owner module class, canonical parameter name, number of dimensions or a
predicate) and of the weight decay and learning-rate scale they receive. Rules
are pure data: resolving them over a model is the job of ``lightning_wd.plan``.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import inspect
import math
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from torch import Tensor, nn

__all__ = ["DecayRule", "ParamPredicate"]

#: Signature of a rule's ``predicate``: ``(canonical_name, parameter, owner_module) -> bool``.
ParamPredicate = Callable[[str, Tensor, nn.Module], bool]

#: Longest accepted pattern; longer strings are refused rather than compiled.
MAX_PATTERN_LENGTH = 256

_GLOB_CHARS = frozenset("*?[")
_NAME_CHARS = re.compile(r"^[A-Za-z0-9_.\-/+]+$")

ModuleSpec = str | type
ParamSpec = str | re.Pattern[str]


def _has_glob(pattern: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in pattern)


@functools.lru_cache(maxsize=4096)
def _compile_glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


#: Flags a compiled ``params`` regex may carry: those of a str pattern, less ``re.DEBUG`` (which prints).
_REGEX_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE | re.ASCII | re.UNICODE

#: Tags of the pickled forms of a class in ``modules`` (``("class", path)``) and of a compiled regex in
#: ``params`` (``("re", pattern, flags)``): tuples of str and int, which ``torch.load(weights_only=True)``
#: reads without any allowlist, and which name no module or function for the loader to import or call.
_CLASS_TAG = "class"
_REGEX_TAG = "re"
_MISSING = object()


def _check_import_path(path: str, argument: str) -> None:
    """Syntax only: a dotted sequence of Python identifiers (nothing is imported or looked up)."""
    if "." not in path or not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(
            f"`{argument}` entry {path!r} is not an import path: write a dotted sequence of Python identifiers"
            " such as 'torch.nn.Linear', a class, or a glob on class names such as '*Linear*'."
        )


def _loaded_class(path: str) -> type | None:
    """The module class that ``path`` names among the modules already imported, or None. Imports nothing.

    Only lookups, no call: the longest prefix of ``path`` present in ``sys.modules``, then its attributes
    through ``inspect.getattr_static`` (no module ``__getattr__``, no descriptor, no property). A class
    whose module is not imported has no instances yet, so it has nothing to match either.
    """
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:cut]))
        if obj is not None:
            break
    else:
        return None
    for attr in parts[cut:]:
        obj = inspect.getattr_static(obj, attr, _MISSING)
        if obj is _MISSING:
            return None
    # `type(obj)`, not `isinstance`: an instance's `__class__` could be a property.
    if issubclass(type(obj), type) and issubclass(obj, nn.Module):
        return obj
    return None


def _class_path(cls: type) -> str:
    """The import path a class in ``modules`` is pickled as; it must name the class itself."""
    path = f"{cls.__module__}.{cls.__qualname__}"
    if "<locals>" in cls.__qualname__:
        raise pickle.PicklingError(
            f"`modules` entry {cls!r} is a local class (defined inside a function) and cannot be pickled: no"
            f" import path names it. Define it at module level, or match it by class name with {cls.__name__!r}."
        )
    if _loaded_class(path) is not cls:
        raise pickle.PicklingError(
            f"`modules` entry {cls!r} cannot be pickled: {path!r} does not name this class (it was created"
            f" dynamically, or replaced since). Define it at module level, or match it by class name with"
            f" {cls.__name__!r}."
        )
    return path


def _encode_module(entry: Any) -> Any:
    return (_CLASS_TAG, _class_path(entry)) if isinstance(entry, type) else entry


def _decode_module(entry: Any) -> Any:
    """A pickled ``modules`` entry: a tagged class path comes back as the class when its module is imported,
    else as the path string (which matches the same modules once it is). Imports nothing."""
    if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0] == _CLASS_TAG):
        return entry
    path = entry[1]
    if not isinstance(path, str):
        raise TypeError(
            f"`modules` class entry must hold an import path string, got {type(path).__name__} {path!r}."
            " The state was not written by DecayRule."
        )
    _check_pattern(path, "modules")
    _check_import_path(path, "modules")
    return _loaded_class(path) or path


def _encode_param(entry: Any) -> Any:
    return (_REGEX_TAG, entry.pattern, int(entry.flags)) if isinstance(entry, re.Pattern) else entry


def _decode_param(entry: Any) -> Any:
    """A pickled ``params`` entry: ``("re", pattern, flags)`` is compiled again, after the checks of a regex."""
    if not (isinstance(entry, tuple) and len(entry) == 3 and entry[0] == _REGEX_TAG):
        return entry
    _, pattern, flags = entry
    if not isinstance(pattern, str) or isinstance(flags, bool) or not isinstance(flags, int):
        raise TypeError(
            f"`params` regular expression must be saved as ('re', str pattern, int flags), got {entry!r}."
            " The state was not written by DecayRule."
        )
    _check_pattern(pattern, "params")
    _check_regex_flags(flags)
    try:
        return re.compile(pattern, flags)
    except re.error as err:
        raise ValueError(
            f"`params` regular expression {pattern!r} does not compile: {err}. Fix the pattern, or use a glob"
            " such as '*.bias'."
        ) from None


def _check_regex_flags(flags: int) -> None:
    if flags & ~_REGEX_FLAGS:
        raise ValueError(
            f"`params` regular expression has flags {int(flags)} outside those a rule keeps ({int(_REGEX_FLAGS)}):"
            " use any of re.IGNORECASE, re.MULTILINE, re.DOTALL, re.VERBOSE, re.ASCII, re.UNICODE."
        )


def _decode_entries(value: Any, decode: Callable[[Any], Any]) -> Any:
    return tuple(decode(entry) for entry in value) if isinstance(value, (tuple, list)) else value


def _resolve_class(path: str, argument: str) -> type:
    """Import and resolve a dotted path to a class, for a rule the user constructs (never when unpickling)."""
    module: Any = None
    attrs: list[str] = []
    # Walk from the longest importable prefix: `torch.nn.modules.linear.Linear` and
    # `pkg.Outer.Inner` both resolve.
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        attrs = parts[cut:]
        break
    if module is None:
        raise ValueError(
            f"`{argument}` entry {path!r} looks like an import path, but no prefix of it can be imported."
            f" Give an importable path such as 'torch.nn.Linear', a class, or a glob on class names such as"
            f" {path.rsplit('.', 1)[-1] + '*'!r}."
        )
    obj: Any = module
    for attr in attrs:
        if not hasattr(obj, attr):
            raise ValueError(
                f"`{argument}` entry {path!r} does not resolve: {module.__name__!r} has no attribute"
                f" {'.'.join(attrs)!r}. Check the spelling, or use a glob on the class name such as"
                f" {attrs[-1] + '*'!r}."
            )
        obj = getattr(obj, attr)
    if not isinstance(obj, type):
        raise TypeError(
            f"`{argument}` entry {path!r} resolves to {type(obj).__name__} {obj!r}, not a class."
            " Import paths may only name module classes: give one such as 'torch.nn.Linear', or a glob on"
            " class names such as '*Linear*'."
        )
    return obj


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, type, re.Pattern)):
        return (value,)
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"patterns must be str, not {type(value).__name__} {value!r}. Decode them to str first.")
    if isinstance(value, (set, frozenset)):
        raise TypeError(
            f"patterns were given as a {type(value).__name__} ({sorted(map(str, value))!r}), whose order is not"
            " deterministic. Pass a list or a tuple."
        )
    if isinstance(value, Sequence):
        return tuple(value)
    raise TypeError(
        f"expected a string, a class or a list of them, got {type(value).__name__} {value!r}."
        " Pass for example '*.bias', torch.nn.LayerNorm or ['*Norm*', 'torch.nn.Embedding']."
    )


def _check_pattern(pattern: str, argument: str) -> None:
    if not pattern:
        raise ValueError(f"`{argument}` contains an empty pattern. Remove it, or use '*' to match everything.")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"`{argument}` pattern of length {len(pattern)} is longer than the limit of {MAX_PATTERN_LENGTH}"
            " characters. Shorten it or split it into several patterns."
        )


def _check_ndim(value: Any, argument: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{argument}` must be an int or None, got {type(value).__name__} {value!r}. Pass for example 2, or"
            " None for no bound."
        )
    if value < 0:
        raise ValueError(f"`{argument}` must be >= 0, got {value}. Use None for no bound.")


def _check_number(value: Any, argument: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{argument}` must be a number, got {type(value).__name__} {value!r}. Pass a Python float such as"
            f" {1.0 if positive else 0.05}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"`{argument}` must be finite, got {value}. Use a finite value such as {1.0 if positive else 0.05}."
        )
    if positive and value <= 0:
        raise ValueError(f"`{argument}` must be > 0, got {value}. Use 1.0 to keep the optimizer's learning rate.")
    if not positive and value < 0:
        raise ValueError(
            f"`{argument}` must be >= 0, got {value}. A negative decay grows the weights; use 0.0 for no decay."
        )
    return value


@dataclass(frozen=True)
class DecayRule:
    """One declarative rule: the parameters it matches and the decay they receive.

    A rule matches a parameter when *every* matcher it has matches (``modules``,
    ``params``, ``min_ndim``/``max_ndim``, ``predicate``); within ``modules`` and
    ``params`` any one entry is enough. A rule without matchers matches every
    parameter. Rules are resolved in list order by ``DecayPlan``:
    a parameter belongs to the first rule that matches any name it is reachable by.

    Rules pickle, and load with ``torch.load(weights_only=True)`` (a module's hyper-parameters in a
    Lightning checkpoint), in every form below. A class in ``modules`` is saved as its import path
    (``("class", "torch.nn.modules.normalization.LayerNorm")``) and a compiled regex in ``params`` as
    ``("re", pattern, flags)``. Loading imports nothing and calls nothing; the values are checked
    again. A saved class comes back as the class when its module is already imported, so the loaded
    rule equals the saved one. Otherwise it comes back as its path string, which matches the same
    modules once that module is imported (no instance of the class can exist before). A class
    defined inside a function cannot be pickled. A ``predicate`` is saved by reference (a
    module-level function), and ``weights_only=True`` loads only allowlisted functions. The
    preset predicates are allowlisted; call ``torch.serialization.add_safe_globals([my_predicate])``
    for yours before loading.

    Args:
        name: Rule name, shown in the plan and used as the group name unless ``group`` is given.
        weight_decay: Decay coefficient λ (finite, >= 0).
        modules: Owner-module matchers: classes (``nn.LayerNorm``), glob patterns on the class
            name or any base-class name (``"*Norm*"``), exact class names (``"RMSNorm"``), or dotted
            import paths (``"torch.nn.Embedding"``). The owner is the module that directly holds
            the parameter. An import path is imported and checked when you construct the rule; when
            matching, it is looked up only among the modules already imported.
        params: Glob patterns (``"*.bias"``) or compiled regular expressions (str patterns, any of
            the flags ``re.IGNORECASE``, ``MULTILINE``, ``DOTALL``, ``VERBOSE``, ``ASCII``, ``UNICODE``),
            matched against the whole canonical parameter name (wrapper prefixes stripped,
            parametrizations unwrapped).
        min_ndim: Match only parameters with at least this many dimensions.
        max_ndim: Match only parameters with at most this many dimensions.
        predicate: ``(name, parameter, owner) -> bool``. Use a module-level function so that the
            rule pickles.
        roles: Match only parameters with one of these roles: ``"linear"`` (the weight of a linear
            map), ``"embedding"`` (a table looked up by data) or ``"other"``. The role comes from the
            forward pass when the plan traced one that used the parameter (``example_inputs=``),
            else from structure (``lightning_wd.presets.role_of``).
        lr_scale: Multiplier applied to the optimizer's learning rate for this rule's group.
        group: Name of the parameter group; rules sharing a group must agree on ``weight_decay``
            and ``lr_scale``. Defaults to ``name``.
        optional: When True, the rule may claim nothing without a warning (presets use this).

    Raises:
        ValueError: on an empty or malformed name, a negative, NaN or infinite ``weight_decay``,
            a non-positive ``lr_scale``, an empty or overlong pattern, ``min_ndim > max_ndim``,
            a regex flag outside those listed, an import path that is malformed or does not
            resolve (when unpickling: malformed only), or a ``roles`` entry that is not a role.
        TypeError: on a value of the wrong type (a pattern that is not a string, a set of patterns,
            a regex compiled from bytes, a predicate that is not callable, an import path naming
            something other than a module class, ``roles`` that is neither a role nor a non-empty list).
        pickle.PicklingError: when pickling a rule whose ``modules`` holds a class no import path
            names (defined inside a function, or created dynamically).

    Examples:
        >>> import io, re, torch
        >>> import lightning_wd as lwd
        >>> rule = lwd.DecayRule("no_decay_norms", 0.0, modules="*Norm*")
        >>> rule.modules
        ('*Norm*',)
        >>> lwd.DecayRule("decay", -0.1)
        Traceback (most recent call last):
        ...
        ValueError: `weight_decay` must be >= 0, got -0.1. A negative decay grows the weights; use 0.0 for no decay.
        >>> rule = lwd.DecayRule("ln", 0.0, modules=torch.nn.LayerNorm, params=re.compile(".*BIAS", re.I))
        >>> buffer = io.BytesIO()
        >>> torch.save(rule, buffer)
        >>> _ = buffer.seek(0)
        >>> loaded = torch.load(buffer, weights_only=True)
        >>> loaded.modules, loaded == rule
        ((<class 'torch.nn.modules.normalization.LayerNorm'>,), True)
    """

    name: str
    weight_decay: float
    modules: str | type | Sequence[str | type] | None = field(default=None, kw_only=True)
    params: str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None = field(default=None, kw_only=True)
    min_ndim: int | None = field(default=None, kw_only=True)
    max_ndim: int | None = field(default=None, kw_only=True)
    predicate: Callable[[str, Tensor, nn.Module], bool] | None = field(default=None, kw_only=True)
    lr_scale: float = field(default=1.0, kw_only=True)
    group: str | None = field(default=None, kw_only=True)
    optional: bool = field(default=False, kw_only=True)
    roles: str | Sequence[str] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._validate(resolve=True)

    def _validate(self, *, resolve: bool) -> None:
        """Check and normalize every field; ``resolve`` imports ``modules``' paths (construction only)."""
        self._check_labels()
        object.__setattr__(self, "weight_decay", _check_number(self.weight_decay, "weight_decay", positive=False))
        object.__setattr__(self, "lr_scale", _check_number(self.lr_scale, "lr_scale", positive=True))
        object.__setattr__(self, "modules", _check_modules(self.modules, resolve=resolve))
        object.__setattr__(self, "params", _check_params(self.params))
        object.__setattr__(self, "roles", _check_roles(self.roles))
        _check_ndim(self.min_ndim, "min_ndim")
        _check_ndim(self.max_ndim, "max_ndim")
        if self.min_ndim is not None and self.max_ndim is not None and self.min_ndim > self.max_ndim:
            raise ValueError(
                f"`min_ndim` ({self.min_ndim}) is greater than `max_ndim` ({self.max_ndim}); the rule could never"
                " match. Swap them or drop one bound."
            )
        if self.predicate is not None and not callable(self.predicate):
            raise TypeError(
                f"`predicate` must be callable as predicate(name, param, module) -> bool, got"
                f" {type(self.predicate).__name__} {self.predicate!r}. Pass a module-level function (so that the"
                " rule pickles), or None."
            )

    def _check_labels(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(
                f"`name` must be a string, got {type(self.name).__name__} {self.name!r}. Use for example"
                " 'no_decay_norms'."
            )
        if not self.name or not _NAME_CHARS.match(self.name):
            raise ValueError(
                f"`name` must be a non-empty string of letters, digits and '_.-/+', got {self.name!r}."
                " It names a parameter group and a logging key; use for example 'no_decay_norms'."
            )
        if self.group is not None and not isinstance(self.group, str):
            raise TypeError(
                f"`group` must be None or a string, got {type(self.group).__name__} {self.group!r}. Use a group"
                " name such as 'decay', or None to use the rule's `name`."
            )
        if self.group is not None and not _NAME_CHARS.match(self.group):
            raise ValueError(
                f"`group` must be None or a non-empty string of letters, digits and '_.-/+', got {self.group!r}."
                " Use for example 'decay', or None to use the rule's `name`."
            )
        if not isinstance(self.optional, bool):
            raise TypeError(
                f"`optional` must be a bool, got {type(self.optional).__name__} {self.optional!r}. Pass True or False."
            )

    @property
    def group_name(self) -> str:
        """The parameter group this rule's parameters go to."""
        return self.group if self.group is not None else self.name

    @functools.cached_property
    def _module_matchers(
        self,
    ) -> tuple[tuple[type, ...], tuple[str, ...], tuple[re.Pattern[str], ...], tuple[re.Pattern[str], ...]]:
        """Classes, import paths (looked up when matching), globs on class names, globs on class paths."""
        classes: list[type] = []
        paths: list[str] = []
        name_globs: list[re.Pattern[str]] = []
        path_globs: list[re.Pattern[str]] = []
        for entry in _as_tuple(self.modules):
            if isinstance(entry, type):
                classes.append(entry)
            elif "." in entry and not _has_glob(entry):
                paths.append(entry)
            elif "." in entry:
                path_globs.append(_compile_glob(entry))
            else:
                name_globs.append(_compile_glob(entry))
        return tuple(classes), tuple(paths), tuple(name_globs), tuple(path_globs)

    @functools.cached_property
    def _module_cache(self) -> dict[type, bool]:
        return {}

    @functools.cached_property
    def _param_matchers(self) -> tuple[re.Pattern[str], ...]:
        return tuple(p if isinstance(p, re.Pattern) else _compile_glob(p) for p in _as_tuple(self.params))

    def matches_module(self, module: nn.Module) -> bool:
        """Whether ``module``'s class matches the ``modules`` matchers (True when there are none).

        A glob without a dot matches the bare name of the class or of any base class (``"*Norm*"``
        matches ``LayerNorm`` and ``LlamaRMSNorm``); a glob with a dot matches their qualified import
        paths (``"torch.nn.*"``). So ``"*norm*"`` never matches a class merely because it is defined
        in a module file called ``normalization.py``.

        An import path is looked up among the modules already imported, never importing one nor
        calling a module's ``__getattr__``: a path that does not resolve yet matches nothing, and is
        looked up again on the next call (the answer for a class is kept once no path is pending). A
        name that a lazy module provides only through ``__getattr__`` is seen once it has been
        accessed; the path of the defining module (``cls.__module__``) always resolves.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> rule = lwd.DecayRule("norms", 0.0, modules="*Norm*")
            >>> rule.matches_module(torch.nn.LayerNorm(4)), rule.matches_module(torch.nn.Linear(4, 4))
            (True, False)
        """
        if self.modules is None:
            return True
        cls = type(module)
        cache = self._module_cache
        hit = cache.get(cls)
        if hit is None:
            hit, final = self._match_class(cls)
            if final:
                cache[cls] = hit
        return hit

    def _match_class(self, cls: type) -> tuple[bool, bool]:
        """Whether ``cls`` matches, and whether that is final (False while an import path does not resolve)."""
        classes, paths, name_globs, path_globs = self._module_matchers
        if classes and issubclass(cls, classes):
            return True, True
        for name, path in _class_names(cls):
            if any(g.match(name) for g in name_globs) or any(g.match(path) for g in path_globs):
                return True, True
        found = tuple(target for target in map(_loaded_class, paths) if target is not None)
        if found and issubclass(cls, found):
            return True, True
        return False, len(found) == len(paths)

    def matches_name(self, name: str) -> bool:
        """Whether the canonical parameter ``name`` matches the ``params`` patterns (True when there are none).

        Examples:
            >>> import lightning_wd as lwd
            >>> rule = lwd.DecayRule("biases", 0.0, params="*.bias")
            >>> rule.matches_name("fc.bias"), rule.matches_name("fc.weight")
            (True, False)
        """
        if self.params is None:
            return True
        return any(p.fullmatch(name) for p in self._param_matchers)

    def matches(self, name: str, param: Tensor, module: nn.Module) -> bool:
        """Whether this rule matches ``param``, reachable as ``name`` and held directly by ``module``.

        Examples:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 2)
            >>> rule = DecayRule("decay", 0.1, modules=torch.nn.Linear, min_ndim=2)
            >>> rule.matches("fc.weight", lin.weight, lin), rule.matches("fc.bias", lin.bias, lin)
            (True, False)
        """
        if self.min_ndim is not None or self.max_ndim is not None:
            ndim = param_ndim(param)
            if self.min_ndim is not None and ndim < self.min_ndim:
                return False
            if self.max_ndim is not None and ndim > self.max_ndim:
                return False
        if self.params is not None and not self.matches_name(name):
            return False
        if self.modules is not None and not self.matches_module(module):
            return False
        if self.roles is not None and _role(name, param, module) not in self.roles:
            return False
        return self.predicate is None or bool(self.predicate(name, param, module))

    # Pickled state: the declared fields only (the cached matchers are derived), in plain data: classes as
    # tagged import paths and regexes as tagged (pattern, flags), so that `weights_only=True` loads them.
    def __getstate__(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.modules is not None:
            state["modules"] = tuple(map(_encode_module, _as_tuple(self.modules)))
        if self.params is not None:
            state["params"] = tuple(map(_encode_param, _as_tuple(self.params)))
        if self.roles is None:  # the state of a rule without it is the one older releases wrote
            del state["roles"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled, perhaps from a checkpoint's hyper-parameters: the declared fields only, validated again
        # without importing anything.
        if not isinstance(state, dict):
            raise TypeError(
                f"DecayRule state must be a dict, got {type(state).__name__}; it was not written by DecayRule."
            )
        declared = fields(self)
        unknown = sorted(map(str, set(state) - {f.name for f in declared}))
        if unknown:
            raise ValueError(f"DecayRule state has unknown fields {unknown}; it was not written by DecayRule.")
        for f in declared:
            if f.name not in state and f.default is MISSING:
                raise ValueError(f"DecayRule state lacks `{f.name}`; it was not written by DecayRule.")
            object.__setattr__(self, f.name, state.get(f.name, f.default))
        object.__setattr__(self, "modules", _decode_entries(self.modules, _decode_module))
        object.__setattr__(self, "params", _decode_entries(self.params, _decode_param))
        self._validate(resolve=False)

    # Copies keep the fields as they are (a local class too): they need no import path, unlike pickles.
    def __copy__(self) -> DecayRule:
        return self._with_fields({f.name: getattr(self, f.name) for f in fields(self)})

    def __deepcopy__(self, memo: dict[int, Any]) -> DecayRule:
        clone = self._with_fields({f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})
        memo[id(self)] = clone
        return clone

    def _with_fields(self, values: dict[str, Any]) -> DecayRule:
        clone = object.__new__(type(self))
        for key, value in values.items():
            object.__setattr__(clone, key, value)
        return clone


def _check_modules(value: Any, *, resolve: bool) -> tuple[ModuleSpec, ...] | None:
    """Normalized ``modules``; ``resolve`` also imports and checks import paths (construction, not unpickling)."""
    try:
        modules = _as_tuple(value)
    except TypeError as err:
        raise TypeError(f"`modules`: {err}") from None
    if value is not None and not modules:
        raise ValueError(
            "`modules` is an empty list, which would silently match every module. Pass None for no module"
            " matcher, or list at least one class, glob or import path."
        )
    for entry in modules:
        if isinstance(entry, type):
            if not issubclass(entry, nn.Module):
                raise TypeError(
                    f"`modules` entry {entry!r} is not a subclass of torch.nn.Module."
                    " Give module classes, class-name globs or import paths."
                )
            continue
        if not isinstance(entry, str):
            raise TypeError(
                f"`modules` entries must be classes or strings, got {type(entry).__name__} {entry!r}."
                " Write a glob such as '*Norm*' or an import path such as 'torch.nn.LayerNorm'."
            )
        _check_pattern(entry, "modules")
        if "." in entry and not _has_glob(entry):
            _check_import_path(entry, "modules")
            if resolve:
                _check_module_class(entry)
    return modules or None


def _check_module_class(path: str) -> None:
    cls = _resolve_class(path, "modules")
    if not issubclass(cls, nn.Module):
        raise TypeError(
            f"`modules` entry {path!r} resolves to {cls!r}, not a torch.nn.Module subclass. Give a"
            " module class such as 'torch.nn.Linear', or a glob on class names such as '*Norm*'."
        )


#: The roles ``DecayRule(roles=...)`` accepts.
ROLE_NAMES = ("linear", "embedding", "other")


def _check_roles(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    roles = (value,) if isinstance(value, str) else value
    if not isinstance(roles, (tuple, list)) or not roles:
        raise TypeError(
            f"`roles` must be a role or a non-empty list of roles, got {type(value).__name__} {value!r}. Pass for"
            f" example 'linear' or ['embedding', 'other']; the roles are {', '.join(ROLE_NAMES)}."
        )
    for role in roles:
        if role not in ROLE_NAMES:
            raise ValueError(
                f"`roles` entry {role!r} is not a role; use any of the following: {', '.join(ROLE_NAMES)}."
            )
    return tuple(roles)


def _role(name: str, param: Tensor, module: nn.Module) -> str:
    from lightning_wd.presets import role_of  # presets build on rules: imported when first matched

    return role_of(name, param, module)


def _check_params(value: Any) -> tuple[ParamSpec, ...] | None:
    try:
        params = _as_tuple(value)
    except TypeError as err:
        raise TypeError(f"`params`: {err}") from None
    if value is not None and not params:
        raise ValueError(
            "`params` is an empty list, which would silently match every parameter. Pass None for no name"
            " matcher, or list at least one glob such as '*.bias'."
        )
    for entry in params:
        if isinstance(entry, re.Pattern):
            if not isinstance(entry.pattern, str):
                raise TypeError(
                    f"`params` regular expressions must be compiled from str, got {entry!r}. Parameter names are"
                    " str: compile a str pattern such as re.compile(r'.*\\.bias')."
                )
            _check_pattern(entry.pattern, "params")
            _check_regex_flags(entry.flags)
            continue
        if not isinstance(entry, str):
            raise TypeError(
                f"`params` entries must be glob strings or compiled regular expressions, got"
                f" {type(entry).__name__} {entry!r}. Write for example '*.bias'."
            )
        _check_pattern(entry, "params")
    return params or None


_CLASS_NAMES: dict[type, tuple[tuple[str, str], ...]] = {}


def _class_names(cls: type) -> tuple[tuple[str, str], ...]:
    """``(name, qualified import path)`` of the class and of every base class, in MRO order."""
    names = _CLASS_NAMES.get(cls)
    if names is None:
        names = tuple((k.__name__, f"{k.__module__}.{k.__qualname__}") for k in cls.__mro__ if k is not object)
        if len(_CLASS_NAMES) < 4096:
            _CLASS_NAMES[cls] = names
    return names


def param_ndim(param: Tensor) -> int:
    """Number of dimensions of a parameter as the model sees it.

    DeepSpeed ZeRO-3 partitions parameters into empty tensors and records the real shape
    in ``ds_shape``; that shape is used when present.
    """
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is not None:
        return len(ds_shape)
    return param.dim()
