"""The adapter protocol: how a framework's model becomes a [`pccore.PCModel`][]."""

import abc
from typing import Any, ClassVar

from ._model import PCModel


class UnsupportedLayerError(TypeError):
    """A layer that predictive coding cannot run as given (e.g. BatchNorm in training mode)."""


class AbstractAdapter(abc.ABC):
    """Converts one framework's models into a [`pccore.PCModel`][] and back.

    Subclass it and register an instance (or a `"module:attribute"` path to one) with
    [`pccore.adapters.register`][], or through the `pccore.adapters` entry-point group.

    **Class attributes:**

    - `name`: a short name such as `"equinox"` or `"flax.nnx"`.
    - `framework_module`: the top-level module of the framework (`"haiku"`). The adapter is
        only consulted once this module has been imported, so `import pccore` never imports
        a framework.
    - `extra`: the pip extra that installs the framework (`"haiku"` for `pccore[haiku]`).
    - `priority`: adapters are tried from high to low; generic matchers (a plain list of
        callables) use a negative priority.
    """

    name: ClassVar[str]
    framework_module: ClassVar[str]
    extra: ClassVar[str | None] = None
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def matches(self, model: Any) -> bool:
        """Whether this adapter handles `model` (plain `isinstance` checks on public classes)."""

    @abc.abstractmethod
    def wrap(self, model: Any, variables: Any = None, **options: Any) -> PCModel:
        """Decompose `model` (with its `variables`, where the framework keeps them apart)."""
