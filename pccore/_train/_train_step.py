"""`TrainStep`: a training step configured once and compiled once per model structure.

Everything a loop of training steps reuses lives on the object the user holds: the
validated configuration, the compiled step per model structure, and what the last calls
returned (so that passing those straight back skips reading the pytrees again).
[`pccore.train_step`][] is a convenience over it that keeps a few of these objects, found by
the configuration it is given ([`pccore.clear_caches`][] drops them).
"""

import dataclasses
import functools as ft
import types
import warnings
import weakref
from collections import OrderedDict
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.tree_util as jtu
import optax
from jaxtyping import PRNGKeyArray

from .._check import (
    as_number,
    check_data,
    check_devices,
    check_init,
    check_model,
    check_opt_state,
)
from .._compiled import compiled
from .._custom_types import BatchArray, StepSizeController
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC
from .._inference._infer import check_solver, with_method
from .._inference import AbstractInference
from .._energy._init import AbstractInit, FeedForward
from ._learn import update
from .._model import PCModel
from .._solution import SteadyState, TrainStats

_TRAINED = ("params", "energy_params")  # the fields a step updates (`PCModel.trainable`)
_STATIC = tuple(f.name for f in dataclasses.fields(PCModel) if f.name not in _TRAINED)
_MAX_STRUCTURES = 16  # model structures (skeletons) one TrainStep compiles for
_MAX_LAST = 4  # returned (model, optimiser state) pairs one TrainStep remembers


def _train_step_impl(*args):
    return update(*args)[:3]


_generic_step = compiled(_train_step_impl)  # models whose layer functions hold arrays


def _fields(model: PCModel) -> dict:
    """The dataclass fields of `model`, read without Equinox's attribute hooks."""
    return object.__getattribute__(model, "__dict__")


def _with_trained(model: PCModel, params, energy_params) -> PCModel:
    """`model` with `params` and `energy_params` in place, sharing every other field (no
    flatten/unflatten, no checks)."""
    new = object.__new__(type(model))
    _fields(new).update(_fields(model))
    _fields(new)["params"] = params
    _fields(new)["energy_params"] = energy_params
    return new


def _trained(model: PCModel) -> tuple:
    """`(params, energy_params)` of a PCModel, the pair the fast path flattens: with no
    energy parameters its leaves are those of `model.params` alone."""
    fields = _fields(model)
    return fields["params"], fields["energy_params"]


def check_trainable_state(optim: optax.GradientTransformation, opt_state: Any, model: Any) -> None:
    """`opt_state` is `optim`'s state for `model.trainable`: refused with the fix otherwise.

    For a model without energy parameters this is the check of `optim.init(model.params)`;
    with them, a state made for the parameters alone (the usual mistake) or any other
    mismatch names `step.init(model)`, i.e. `optim.init(model.trainable)`."""
    if getattr(model, "energy_params", None) is None:
        check_opt_state(optim, opt_state, model.params)
        return
    fix = ("Start the optimiser on everything the model trains, `opt_state = step.init(model)` "
           "(a pccore.TrainStep) or `opt_state = optim.init(model.trainable)`, after "
           "`model = model.with_energy_params(...)`, and pass back the state each call returns.")
    if opt_state is None:
        raise TypeError(f"`opt_state` is None; expected the optimiser's state for this model. {fix}")
    try:
        check_opt_state(optim, opt_state, model.trainable)
    except (TypeError, ValueError):
        try:
            check_opt_state(optim, opt_state, model.params)
            what = ("it was made for `model.params` alone, but this model also trains its "
                    "energy's parameters (`model.energy_params`)")
        except (TypeError, ValueError):
            what = ("it does not fit `optim.init(model.trainable)` (a state from another "
                    "optimiser or another model)")
        raise ValueError(f"`opt_state` does not match this model: {what}. {fix}") from None


def _immutable(treedef) -> bool:
    """Whether a pytree of this structure cannot change after it is built: only tuples
    (named or not), None and Equinox modules. A dict can be changed in place (optax's
    `inject_hyperparams` state is changed that way to set a new learning rate), so what it
    holds must be read on every call."""
    data = treedef.node_data()
    if data is None:  # a leaf
        return True
    if not (data[0] is type(None) or issubclass(data[0], tuple | eqx.Module)):
        return False
    return all(_immutable(child) for child in treedef.children())


def _data_sig(a):
    """Shape and dtype of a device array; host data (scanned for NaN on every call) gets a
    fresh object that equals nothing, so it always takes the checked path."""
    if a is None:
        return None
    return (a.shape, a.dtype) if isinstance(a, jax.Array) else object()


def _remember(table: OrderedDict, key, value, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def _forget(table: dict, key: int, ref) -> None:
    """Weak-reference callback: the model of a remembered call is gone.

    Bound to its table with `functools.partial`: at interpreter exit a model can die after
    module globals are cleared, so the callback must not look anything up there.
    """
    entry = table.get(key)
    if entry is not None and entry.ref is ref:
        table.pop(key, None)  # (a plain dict: safe if garbage collection runs this mid-update)


class _Skeleton:
    """A model structure without its parameters (the step's static part), and its compiled
    steps, one per structure of the parameters and the optimiser state."""

    __slots__ = ("model", "flat", "sigs")

    def __init__(self, model: PCModel):
        self.model = _with_trained(model, jax.eval_shape(lambda: model.params), None)
        self.flat: OrderedDict = OrderedDict()  # (pdef, sdef) -> _FlatStep
        self.sigs: set = set()  # data shapes and dtypes already validated for it


class _FlatStep:
    """The step on flat lists of leaves, for one structure of the trained pair
    `(params, energy_params)` and of the optimiser state.

    `jax.jit` flattens pytree arguments and rebuilds pytree outputs on every call, and
    Equinox modules flatten in Python: on a 20-layer MLP the parameters and Adam state cost
    about 150 µs to read and 85 µs to rebuild, per step. Here the jitted function takes and
    returns leaves; the structures are recorded at trace time.
    """

    __slots__ = ("jitted", "p_out", "s_out", "reusable")

    def __init__(self, step, pdef, sdef):
        self.p_out = self.s_out = None
        self.reusable = None  # whether its results can be remembered (see `_immutable`)

        def flat(p_leaves, s_leaves, x, y, key):
            trained, opt_state, stats = step(
                jtu.tree_unflatten(pdef, p_leaves), jtu.tree_unflatten(sdef, s_leaves), x, y, key
            )
            p, self.p_out = jtu.tree_flatten(trained)
            s, self.s_out = jtu.tree_flatten(opt_state)
            return p, s, stats

        flat.__name__ = flat.__qualname__ = "_train_step"  # as compile logs name it
        self.jitted = jax.jit(flat)


class _Last:
    """What a call returned: the model (weakly), the optimiser state, their leaves."""

    __slots__ = ("ref", "opt_state", "flat", "p_leaves", "s_leaves", "sig")


class TrainStep:
    r"""One predictive coding training step, configured once: initialise, infer, update.

    1. initialise the activities (`init`, feed-forward by default);
    2. equilibrate them with [`pccore.infer`][]'s engine (`solver`, `t1`, `dt0`, ...);
    3. take $\nabla_\theta \mathcal L$ at the result ([`pccore.param_grads`][]);
    4. apply one `optim` update.

    ```python
    step = pccore.TrainStep(optax.adam(1e-3), energy=pccore.PC(loss=pccore.CrossEntropy()))
    opt_state = step.init(model)
    for x, y in batches:
        model, opt_state, stats = step(model, opt_state, x=x, y=y)
    ```

    The configuration is validated when the object is built. The step compiles once per
    model structure (and shape of the data) and keeps the compiled versions, so a loop pays
    for compilation once; hyper-parameters given as Python numbers are compile-time
    constants. Passing back exactly the model and optimiser state a call returned (a
    training loop does) skips reading their pytrees again: the last few returned pairs are
    remembered, each released with its model. [`pccore.TrainStep.clear`][] drops all of it.

    If inference diverges, the objective is non-finite, or the update would make a
    parameter non-finite, the parameters, the optimiser state and any running averages are
    returned unchanged and `stats.updated` is False. A model in training mode (BatchNorm,
    Dropout) runs as [`pccore.train_step`][] describes.

    **Arguments:** `optim`, an optax optimiser for the parameters; `energy`, `method` (an
    inference-method object such as [`pccore.GradientFlow`][]) or its shorthand `solver`,
    `stepsize_controller`, `t1`, `dt0`; `max_steps`, `steady_state` and `init` as in
    [`pccore.infer`][] and [`pccore.train_step`][].
    """

    def __init__(
        self,
        optim: optax.GradientTransformation,
        *,
        energy: AbstractEnergy = PC(),
        method: AbstractInference | None = None,
        solver: Any = diffrax.Euler(),
        stepsize_controller: StepSizeController = diffrax.ConstantStepSize(),
        t1: float | None = None,
        dt0: float | None = 0.1,
        max_steps: int | None = None,
        steady_state: SteadyState | None = None,
        init: AbstractInit = FeedForward(),
    ):
        if not isinstance(optim, optax.GradientTransformation):
            raise TypeError(
                f"`optim` must be an optax GradientTransformation (e.g. optax.adam(1e-3)); got "
                f"{type(optim).__name__}."
            )
        if not isinstance(energy, AbstractEnergy):
            raise TypeError(
                f"`energy` must be a pccore.AbstractEnergy such as pccore.PC(); got "
                f"{type(energy).__name__}."
            )
        t1, dt0 = as_number("t1", t1), as_number("dt0", dt0)
        solver = with_method(method, solver, stepsize_controller, t1, dt0)
        n, t1_, dt0_ = check_solver(solver, stepsize_controller, t1, dt0, max_steps,
                                    steady_state, None)
        self.optim = optim
        self.energy = energy
        self.solver = solver
        self.stepsize_controller = stepsize_controller
        self.t1: float | None = t1
        self.dt0: float | None = dt0
        self.max_steps: int | None = max_steps
        self.steady_state = steady_state
        self.initialiser = init
        self._checked = (t1_, dt0_, n)
        config = (optim, energy, solver, stepsize_controller, steady_state, init)
        # a configuration with arrays in it is traced, not compiled in: the generic path
        self._plannable = not any(eqx.is_array(a) for a in jtu.tree_leaves(config))
        self._skeletons: OrderedDict = OrderedDict()  # id(model.layers) -> _Skeleton
        self._structures: OrderedDict = OrderedDict()  # the model's tree structure -> _Skeleton
        self._last: dict = {}  # id(returned model) -> _Last, oldest first

    def init(self, model: PCModel) -> optax.OptState:
        """The optimiser's initial state for `model`: `optim.init(model.trainable)`.

        **Arguments:** `model`, the model to train; where it holds energy parameters
        ([`pccore.PCModel.with_energy_params`][]), set them before this call.

        **Returns:** `optim.init(model.params)` for a model without energy parameters, else
        the state for the pair `(model.params, model.energy_params)`."""
        return self.optim.init(model.trainable)

    def clear(self) -> None:
        """Drop the compiled steps and the remembered results (the next call compiles again)."""
        self._skeletons.clear()
        self._structures.clear()
        self._last.clear()

    def __call__(
        self,
        model: PCModel,
        opt_state: optax.OptState,
        *,
        x: BatchArray | None = None,
        y: BatchArray | None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[PCModel, optax.OptState, TrainStats]:
        """One training step. **Returns:** `(model, opt_state, stats)` with a
        [`pccore.TrainStats`][]."""
        sig = (_data_sig(x), _data_sig(y))
        last = self._last.get(id(model))
        if (
            last is not None
            and last.ref() is model
            and last.opt_state is opt_state
            and last.sig == sig
        ):
            # What the last call returned, passed straight back: its leaves are known.
            return self._run(last.flat, model, last.p_leaves, last.s_leaves, x, y, key, sig)
        skel = self._skeleton(model)
        if skel is None or sig not in skel.sigs:
            x, y = check_data(model, self.energy, x, y, scan_targets=True)
            check_init(self.initialiser, key)
            check_devices(model, x, y)
            if opt_state is None:  # refused with the fix (a state is otherwise checked on failure)
                check_trainable_state(self.optim, None, model)
        if skel is not None and all(eqx.is_array(a) for a in jtu.tree_leaves((_trained(model), opt_state))):
            p_leaves, pdef = jtu.tree_flatten(_trained(model))
            s_leaves, sdef = jtu.tree_flatten(opt_state)
            flat = skel.flat.get((pdef, sdef))
            if flat is None:
                flat = _FlatStep(self._step_fn(skel), pdef, sdef)
                _remember(skel.flat, (pdef, sdef), flat, 8)
            out = self._execute(opt_state, model, self._run, flat, model, p_leaves,
                                s_leaves, x, y, key, sig)
            if all(a is None or isinstance(a, tuple) for a in sig):
                skel.sigs.add(sig)  # device data, validated and run: later calls skip checks
            return out
        t1, dt0, n = self._checked
        return self._execute(opt_state, model, _generic_step, model, self.optim,
                             opt_state, x, y, self.energy, self.solver, self.stepsize_controller,
                             t1, dt0, n, self.steady_state, self.initialiser, key)

    def _skeleton(self, model: PCModel) -> _Skeleton | None:
        """The model's structure, compiled for, or None if it cannot be compiled in (its layer
        functions hold arrays, the configuration does, or it is not a PCModel)."""
        if not self._plannable or type(model) is not PCModel:
            return None
        fields = _fields(model)
        skel = self._skeletons.get(id(fields["layers"]))
        if skel is not None:
            known = _fields(skel.model)
            if all(known[f] is fields[f] for f in _STATIC):
                return skel
        if any(eqx.is_array(a) for a in jtu.tree_leaves(model.layers)):
            return None
        # another object of a structure compiled before (a copy, a restored checkpoint)
        structure = jtu.tree_structure(_with_trained(model, None, None))
        try:
            skel = self._structures.get(structure)
        except TypeError:  # an unhashable static field
            structure = skel = None
        if skel is None:
            skel = _Skeleton(model)
            if structure is not None:
                _remember(self._structures, structure, skel, _MAX_STRUCTURES)
        _remember(self._skeletons, id(model.layers), skel, _MAX_STRUCTURES)
        return skel

    def _step_fn(self, skel: _Skeleton):
        t1, dt0, n = self._checked
        optim, energy, solver = self.optim, self.energy, self.solver
        controller, steady, init = self.stepsize_controller, self.steady_state, self.initialiser

        def _train_step(trained, opt_state, x, y, key):
            params, energy_params = trained
            model = skel.model.with_params(params)
            if energy_params is not None:
                model = model.with_energy_params(energy_params)
            check_model(model, energy)  # at trace time: dtypes of new parameters
            model, opt_state, stats, _ = update(model, optim, opt_state, x, y, energy, solver,
                                                controller, t1, dt0, n, steady, init, key)
            return _trained(model), opt_state, stats

        return _train_step

    def _run(self, flat: _FlatStep, model, p_leaves, s_leaves, x, y, key, sig):
        """Call a compiled step on leaves; remember what it returned for the next call."""
        p, s, stats = flat.jitted(p_leaves, s_leaves, x, y, key)
        new = _with_trained(model, *jtu.tree_unflatten(flat.p_out, p))
        opt_state = jtu.tree_unflatten(flat.s_out, s)
        if flat.reusable is None:
            flat.reusable = _immutable(flat.p_out) and _immutable(flat.s_out)
        if not flat.reusable:
            return new, opt_state, stats
        last = _Last()
        key_ = id(new)
        last.ref = weakref.ref(new, ft.partial(_forget, self._last, key_))
        last.opt_state, last.flat, last.p_leaves, last.s_leaves = opt_state, flat, p, s
        last.sig = sig
        self._last.pop(key_, None)  # an id reused after its model died: re-insert as newest
        self._last[key_] = last
        while len(self._last) > _MAX_LAST:
            self._last.pop(next(iter(self._last)), None)
        return new, opt_state, stats

    def _execute(self, opt_state, model, fn, *args):
        """`fn(*args)`, a compiled step; an optimiser state from another optimiser or model
        fails inside the optimiser's update (at trace time), and is named instead (costs
        nothing when the step succeeds)."""
        try:
            return fn(*args)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            check_trainable_state(self.optim, opt_state, model)
            raise


_STEPS: OrderedDict = OrderedDict()  # identity of the configuration -> (objects, TrainStep)
_LAST_CONFIG: list = [None]  # the last call's configuration and step
_STEPS_BY_VALUE: OrderedDict = OrderedDict()  # equal configurations share one TrainStep
_MAX_STEPS = 32


def _same_number(a, b) -> bool:
    return a is b or (type(a) is type(b) and type(a) in (int, float) and a == b)


_NAMES = ("optim", "energy", "solver", "stepsize_controller", "steady_state", "init")
_FINGERPRINTS: OrderedDict = OrderedDict()  # fingerprint of a configuration -> its objects
_WARNED: set = set()


def _fingerprint(obj: Any, depth: int = 0) -> Any:
    """What a configuration object computes with, for telling a rebuilt equal object from a
    new one: numbers and strings by value, functions by their code and what they close over
    (an optax optimiser is a pair of closures), hashable objects by value, others by
    identity."""
    if depth > 6:
        return ("deep", id(obj))
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, types.FunctionType):
        cells = []
        for c in obj.__closure__ or ():
            try:
                cells.append(_fingerprint(c.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                cells.append(None)
        return ("fn", obj.__code__, tuple(cells))
    if isinstance(obj, tuple):  # NamedTuples too (optax's GradientTransformation)
        return (type(obj), tuple(_fingerprint(o, depth + 1) for o in obj))
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return obj


def _rebuilt(config: tuple, step: TrainStep) -> tuple[TrainStep | None, list[str]]:
    """An earlier step of a configuration equal in value to `config` but made of other
    objects, and the names of those objects; `(None, [])` if there is none. Records `step`
    for `config` otherwise."""
    try:
        fp = tuple(_fingerprint(c) for c in config)
        seen = _FINGERPRINTS.get(fp)
    except TypeError:
        return None, []
    if seen is None or all(a is b for a, b in zip(config, seen[0])):
        _remember(_FINGERPRINTS, fp, (config, step), _MAX_STEPS)
        return None, []
    _remember(_FINGERPRINTS, fp, (config, step), _MAX_STEPS)
    return seen[1], [n for n, a, b in zip(_NAMES, config, seen[0]) if a is not b]


def _warn_if_rebuilt_in_a_loop(model: Any, prior: TrainStep | None, names: list[str]) -> None:
    """Warn once when a loop builds its configuration inside itself: the model comes straight
    from a step of an equal configuration made of other objects, so every call compiles."""
    if prior is None or not names:
        return
    last = prior._last.get(id(model))
    if last is None or last.ref() is not model or "rebuilt" in _WARNED:
        return
    _WARNED.add("rebuilt")
    listed = ", ".join(f"`{n}`" for n in names)
    warnings.warn(
        f"pccore.train_step: {listed} {'is a new object' if len(names) == 1 else 'are new objects'} "
        "equal to the last call's, so this step compiles again (about a second, every call of "
        f"a loop that builds {listed} inside it). Build {listed} once, outside the loop, or hold "
        "a `pccore.TrainStep(optim, ...)` and call it.",
        UserWarning,
        stacklevel=4,  # the caller of pccore.train_step
    )


def step_for(optim, energy, solver, controller, t1, dt0, max_steps, steady_state,
             init, model: Any = None) -> TrainStep:
    """The `TrainStep` of this configuration, kept for `train_step` (bounded; equal
    configurations share one; [`pccore.clear_caches`][] empties it)."""
    last = _LAST_CONFIG[0]
    if (  # a loop: the same objects as the last call (unrolled, it is on every call's path)
        last is not None and last[0] is optim and last[1] is energy and last[2] is solver
        and last[3] is controller and last[4] is steady_state and last[5] is init
        and _same_number(last[6], t1) and _same_number(last[7], dt0)
        and _same_number(last[8], max_steps)
    ):
        return last[9]
    step = _step_for(optim, energy, solver, controller, t1, dt0, max_steps, steady_state, init,
                     model)
    _LAST_CONFIG[0] = (optim, energy, solver, controller, steady_state, init, t1, dt0, max_steps,
                       step)
    return step


def _step_for(optim, energy, solver, controller, t1, dt0, max_steps, steady_state, init,
              model) -> TrainStep:
    config = (optim, energy, solver, controller, steady_state, init)
    nums = (t1, dt0, max_steps)
    ident = (*map(id, config), *nums)
    try:
        entry = _STEPS.get(ident)
    except TypeError:  # an unhashable number (an array): validated and converted below
        entry = ident = None
    if entry is not None:
        objects, numbers, step = entry
        if all(a is b for a, b in zip(objects, config)) and all(
                _same_number(a, b) for a, b in zip(numbers, nums)):
            return step
    step = TrainStep(optim, energy=energy, solver=solver, stepsize_controller=controller,
                     t1=t1, dt0=dt0, max_steps=max_steps, steady_state=steady_state, init=init)
    by_value = (*config, *step._checked)
    try:
        shared = _STEPS_BY_VALUE.get(by_value)
    except TypeError:  # an unhashable option: this configuration gets its own
        shared, by_value = None, None
    if shared is not None:
        step = shared
    else:
        _warn_if_rebuilt_in_a_loop(model, *_rebuilt(config, step))
        if by_value is not None:
            _remember(_STEPS_BY_VALUE, by_value, step, _MAX_STEPS)
    if ident is not None:
        _remember(_STEPS, ident, (config, nums, step), _MAX_STEPS)
    return step


def clear_caches() -> None:
    """Drop every compiled training step that [`pccore.train_step`][] keeps, and what it
    remembers of the last calls (a [`pccore.TrainStep`][] you hold keeps its own; see
    [`pccore.TrainStep.clear`][]). The next call compiles again."""
    for _, _, step in _STEPS.values():
        step.clear()
    _STEPS.clear()
    _LAST_CONFIG[0] = None
    _STEPS_BY_VALUE.clear()
    _FINGERPRINTS.clear()
    _WARNED.clear()


def train_step(
    model: PCModel,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    *,
    x: BatchArray | None = None,
    y: BatchArray | None,
    energy: AbstractEnergy = PC(),
    method: AbstractInference | None = None,
    solver: Any = diffrax.Euler(),
    stepsize_controller: StepSizeController = diffrax.ConstantStepSize(),
    t1: float | None = None,
    dt0: float | None = 0.1,
    max_steps: int | None = None,
    steady_state: SteadyState | None = None,
    init: AbstractInit = FeedForward(),
    key: PRNGKeyArray | None = None,
) -> tuple[PCModel, optax.OptState, TrainStats]:
    """One jitted predictive coding training step: initialise, infer, update the parameters.

    1. initialise the activities (`init`, feed-forward by default);
    2. equilibrate them with [`pccore.infer`][]'s engine (`solver`, `t1`, `dt0`, ...);
    3. take $\\nabla_\\theta \\mathcal L$ at the result ([`pccore.param_grads`][]);
    4. apply one `optim` update.

    `opt_state = optim.init(model.trainable)` starts the optimiser (`model.trainable` is
    `model.params` unless the model holds energy parameters, see
    [`pccore.PCModel.trainable`][]); thread the returned state
    into the next call. Calling again with new data of the same shapes does not recompile
    (hyper-parameters given as Python numbers are compile-time constants: changing one
    recompiles). If inference diverges, the objective is non-finite, or the update would make
    a parameter non-finite (an overflow), the parameters and the optimiser state are returned
    unchanged and `stats.updated` is False.

    This is a convenience over [`pccore.TrainStep`][]: it keeps the `TrainStep` of each
    configuration it is called with (a bounded set, found by the identity of the
    configuration objects and shared between equal ones; [`pccore.clear_caches`][] empties
    it), so a loop compiles once. Build the optimiser and the other options once, outside
    the loop. Passing back exactly the model and optimiser state a call returned (a training
    loop does) skips reading their pytrees again; the last few returned pairs are remembered,
    each released with its model.

    A model in training mode (`model.training`: train-mode BatchNorm or Dropout, see
    [`pccore.AbstractStatefulLayer`][]) runs its training forward throughout the step: batch
    statistics of the current activities, and dropout masks drawn once per step, from
    `jax.random.split(key)[0]` (a random initialiser gets `[1]`), so inference descends one
    fixed energy; pass a new `key` every step. Its running averages are then updated once, at
    the equilibrium, with the parameters inference used, and returned in the model
    ([`pccore.PCModel.unwrap_state`][]); they are kept unchanged when the update is skipped.

    **Arguments:** `model`, `x`, `y`, `energy`, `method` and the solver options as in
    [`pccore.infer`][]; `optim` an optax optimiser for the parameters, `opt_state` its state;
    `key` for random initialisers and dropout masks.

    **Returns:** `(model, opt_state, stats)` with a [`pccore.TrainStats`][].
    """
    if method is not None:
        solver = with_method(method, solver, stepsize_controller, t1, dt0)
    step = step_for(optim, energy, solver, stepsize_controller, t1, dt0, max_steps, steady_state,
                    init, model)
    return step(model, opt_state, x=x, y=y, key=key)
