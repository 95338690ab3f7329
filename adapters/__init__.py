"""Adapters from model frameworks to [`pccore.PCModel`][], and their registry.

Adapters are looked up lazily: an adapter is only imported once its framework has been
imported by the user (a Haiku object cannot exist before `haiku` is imported), so
`import pccore` imports no model framework. A third-party package adds an adapter with
[`pccore.adapters.register`][], or declares it in its own packaging metadata:

```toml
[project.entry-points."pccore.adapters"]
toyfw = "toyfw_pc:ToyAdapter"   # name = the framework's module (its full dotted path)
```

The adapter is tried once the module its name gives is imported (`jax.example_libraries`
waits for that submodule, not for `jax`). A plugin that fails to import is skipped with a
warning naming it; the other adapters keep working.
"""

import dataclasses
import importlib
import sys
import warnings
from importlib.metadata import entry_points
from typing import Any

from pccore._adapter import AbstractAdapter as AbstractAdapter
from pccore._adapter import UnsupportedLayerError as UnsupportedLayerError

_EXTRAS = {"haiku": "haiku", "flax": "flax", "flax.linen": "flax", "flax.nnx": "flax"}
_PACKAGES = {"haiku": "dm-haiku", "flax": "flax", "flax.linen": "flax", "flax.nnx": "flax"}


@dataclasses.dataclass
class _Entry:
    name: str
    framework_module: str
    adapter: AbstractAdapter | str
    priority: int | None  # None: the adapter's own, read when it is first imported
    broken: bool = False  # failed to import: skipped (warned once)


_REGISTRY: dict[str, _Entry] = {}
_ENTRY_POINTS_LOADED = False


def register(
    name: str,
    adapter: AbstractAdapter | str,
    *,
    framework_module: str | None = None,
    priority: int | None = None,
    override: bool = False,
) -> None:
    """Register an adapter.

    **Arguments:**

    - `name`: a unique name for the adapter.
    - `adapter`: an [`pccore.adapters.AbstractAdapter`][] instance, or a
        `"package.module:attribute"` path to one (or to its class), imported on first use.
    - `framework_module`: the framework's module (a dotted path); the adapter is only tried once
        it is in `sys.modules`. Read from the adapter when it is an instance.
    - `priority`: higher is tried first (default: the adapter's own `priority` class
        attribute; for a path, read when its framework has been imported).
    - `override`: replace an adapter already registered under `name` (also one declared as
        an entry point, before or after entry points are read).
    """
    _load_entry_points()
    if name in _REGISTRY and not override:
        raise ValueError(
            f"an adapter named {name!r} is already registered; pass `override=True` to "
            "replace it or choose another `name`."
        )
    if isinstance(adapter, AbstractAdapter):
        framework_module = framework_module or adapter.framework_module
        priority = adapter.priority if priority is None else priority
    elif isinstance(adapter, str):
        if ":" not in adapter:
            raise ValueError(
                f"`adapter` must be an AbstractAdapter or a 'module:attribute' path; got "
                f"{adapter!r}."
            )
        if framework_module is None:
            raise ValueError("`framework_module` is required when `adapter` is a path.")
    else:
        raise TypeError(
            f"`adapter` must be an AbstractAdapter instance or a 'module:attribute' path; "
            f"got {type(adapter).__name__}."
        )
    _REGISTRY[name] = _Entry(name, framework_module, adapter, priority)


def unregister(name: str) -> None:
    """Remove the adapter registered under `name` (also one declared as an entry point)."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(f"no adapter named {name!r}; registered: {sorted(_REGISTRY)}.")
    del _REGISTRY[name]


def registered() -> list[str]:
    """Names of the registered adapters (entry points included)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="pccore.adapters"):  # reading them imports nothing
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = _Entry(ep.name, ep.name, ep.value, None)


def _instantiate(entry: _Entry) -> AbstractAdapter:
    if isinstance(entry.adapter, str):
        module, _, attr = entry.adapter.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        obj = obj() if isinstance(obj, type) else obj
        if not isinstance(obj, AbstractAdapter):
            raise TypeError(
                f"adapter {entry.name!r} ({entry.adapter}) is a {type(obj).__name__}, not a "
                "pccore.adapters.AbstractAdapter."
            )
        entry.adapter = obj
    if entry.priority is None:
        entry.priority = entry.adapter.priority
    return entry.adapter


def _usable(entry: _Entry) -> AbstractAdapter | None:
    """The entry's adapter, or None (and one warning) if it cannot be imported: one broken
    plugin must not stop the other frameworks from wrapping."""
    try:
        return _instantiate(entry)
    except Exception as e:
        entry.broken = True
        warnings.warn(
            f"pccore adapter {entry.name!r} ({entry.adapter}) failed to load and is skipped: "
            f"{type(e).__name__}: {e}. Fix or uninstall the package that provides it, or "
            f"`pccore.adapters.unregister({entry.name!r})`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def get_adapter(model: Any) -> AbstractAdapter:
    """The registered adapter that handles `model` (highest priority first)."""
    _load_entry_points()
    loaded = [e for e in _REGISTRY.values() if e.framework_module in sys.modules and not e.broken]
    for entry in loaded:  # an adapter registered by path, without `priority`, has its own
        if entry.priority is None:
            _usable(entry)
    checked = []
    for entry in sorted((e for e in loaded if not e.broken), key=lambda e: -(e.priority or 0)):
        checked.append(entry.name)
        adapter = _usable(entry)
        if adapter is not None and adapter.matches(model):
            return adapter
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    raise TypeError(
        f"`model`: no predictive-coding adapter for an object of type {kind}. Checked "
        f"{checked}; registered: {sorted(_REGISTRY)}. Expected an Equinox module (eqx.nn.MLP, "
        "eqx.nn.Sequential, or a list of layers), a Haiku transform with its params, a Flax "
        "Linen module with its variables, or a Flax NNX module. Third-party adapters "
        "register with pccore.adapters.register() or the 'pccore.adapters' entry-point group."
    )


def require(framework: str) -> Any:
    """Import a framework by name, or raise an ImportError naming the pccore extra."""
    try:
        return importlib.import_module(framework)
    except ImportError as e:
        extra = _EXTRAS.get(framework, framework.split(".")[0])
        package = _PACKAGES.get(framework, framework.split(".")[0])
        raise ImportError(
            f"pccore's {framework!r} adapter needs `{package}`, which is not installed. "
            f'Install it with: pip install "pccore[{extra}]"'
        ) from e


# Built-ins state their priority, so that ordering them imports none of them.
register(
    "equinox", "pccore.adapters._equinox:EquinoxAdapter", framework_module="equinox", priority=0
)
register(
    "equinox.sequence",
    "pccore.adapters._equinox:EquinoxSequenceAdapter",
    framework_module="equinox",
    priority=-10,
)

register("haiku", "pccore.adapters._haiku:HaikuAdapter", framework_module="haiku", priority=0)
register("flax.linen", "pccore.adapters._linen:LinenAdapter", framework_module="flax", priority=0)
register("flax.nnx", "pccore.adapters._nnx:NNXAdapter", framework_module="flax", priority=0)

__all__ = [
    "AbstractAdapter",
    "UnsupportedLayerError",
    "get_adapter",
    "register",
    "registered",
    "require",
    "unregister",
]
