"""User reward functions, TRL- or verl-style, loaded from a file or a module and used as a term.

Config::

    reward.custom.path=my_rewards.py     # or a dotted module path: my_pkg.rewards
    reward.custom.name=brevity           # function name inside it
    reward.custom.weight=0.5
    reward.custom.style=auto             # auto | trl | verl

Two styles are accepted:

* **TRL** (``GRPOTrainer(reward_funcs=...)``): ``fn(prompts, completions, completion_ids,
  **kwargs) -> list[float | None]`` over the whole batch. ``kwargs`` carry ``answer`` (the gold
  answers), ``finish_reasons``, ``correct`` (graded once by rlspec), ``group_ids``, ``step`` and
  every other dataset column by name. ``None`` means "no reward for this one" and counts as 0.0.
* **verl** (``custom_reward_function``): ``compute_score(data_source, solution_str,
  ground_truth, extra_info=None) -> float | dict`` per completion; a dict's ``"score"`` is used.
  ``data_source`` is the ``data_source`` column (``"rlspec"`` if there is none) and
  ``extra_info`` is the ``extra_info`` column's dict (if any) plus the index, prompt, finish
  reason, correctness, group id, step and the other columns.

``style=auto`` picks verl when the function has ``solution_str`` and ``ground_truth``
parameters, TRL when it has ``completions``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from rlspec.errors import ConfigError, RLSpecError, TrainingError
from rlspec.rewards.grader import _in_finalizer
from rlspec.rewards.terms import REWARD_TERMS, RewardBatch, _term_spec, check_term_kwargs

logger = logging.getLogger(__name__)

STYLES = ("auto", "trl", "verl")
CUSTOM_PREFIX = "custom:"
RESEND_S = 0.2  # the watchdog's SIGUSR1 repeats this often until disarmed


class _RewardTimeout(BaseException):
    """Raised in the main thread by the watchdog's SIGUSR1. A BaseException so that the user's
    ``except Exception`` cannot swallow it."""


def _run_with_watchdog(run: Callable[[], None], timeout_s: float, name: str) -> bool:
    """Call ``run`` in this (the main) thread; ``False`` when ``timeout_s`` passed first.

    The user's function stays in the main thread because math-verify's ``parse``/``verify``
    (TRL's ``accuracy_reward``, most math rewards) refuse any other thread. A watchdog thread
    sends SIGUSR1 to the main thread at the deadline, and again every ``RESEND_S`` until
    disarmed, so a bare ``except:`` in the user's code cannot swallow it for good; the handler
    raises only while armed. Not SIGALRM: math-verify's own ``signal.alarm`` would clobber it.
    A call stuck inside one long C function is stopped only when that function returns.
    """
    armed = True
    fired = threading.Event()
    disarmed = threading.Event()
    main_ident = threading.main_thread().ident

    def on_signal(signum: int, frame: Any) -> None:
        # never raise inside a finalizer: Python would only print "Exception ignored"; it re-fires
        if armed and not _in_finalizer(frame):
            raise _RewardTimeout

    def watchdog() -> None:
        if disarmed.wait(timeout_s):
            return
        fired.set()
        while True:
            signal.pthread_kill(main_ident, signal.SIGUSR1)
            if disarmed.wait(RESEND_S):
                return

    dog = threading.Thread(target=watchdog, name=f"rlspec-reward-watchdog-{name}", daemon=True)
    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:
        try:
            dog.start()
            run()
        finally:
            armed = False
            disarmed.set()
    except _RewardTimeout:
        pass
    finally:
        armed = False
        disarmed.set()
        # join before restoring: a SIGUSR1 sent after the restore would hit the default action
        # (the process dies); ours, disarmed, ignores it
        dog.join()
        if previous is not None:  # None: set outside Python; ours stays, disarmed
            signal.signal(signal.SIGUSR1, previous)
    return not fired.is_set()  # the deadline passed, even if a bare except swallowed the signal


def _is_file_path(path_or_module: str) -> bool:
    return path_or_module.endswith(".py") or "/" in path_or_module or "\\" in path_or_module


def _load_module(path_or_module: str) -> tuple[ModuleType, str]:
    """Import ``path_or_module``; returns the module and how to name it in messages."""
    if _is_file_path(path_or_module):
        path = Path(path_or_module).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"reward.custom.path: no file {path_or_module!r} (looked for {path.resolve()}); "
                f"fix: give an absolute path, or one relative to the directory you launched from"
            )
        path = path.resolve()
        # A stable, unique module name per file, so that re-loading the same file replaces it and
        # objects defined in the file (dataclasses, pickles) can find their module.
        module_name = f"_rlspec_custom_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"reward.custom.path: cannot import {path}; fix: point it to a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(module_name, None)
            raise ConfigError(
                f"reward.custom.path: importing {path} failed with {type(err).__name__}: {err}; "
                f"fix that error in the file"
            ) from err
        return module, str(path)
    try:
        return importlib.import_module(path_or_module), f"module {path_or_module}"
    except ModuleNotFoundError as err:
        if err.name is not None and (path_or_module + ".").startswith(err.name + "."):
            raise ConfigError(
                f"reward.custom.path: no module {path_or_module!r} on the Python path; fix: give the "
                f"path of a .py file (e.g. ./my_rewards.py) or install/add the module to PYTHONPATH"
            ) from err
        raise ConfigError(
            f"reward.custom.path: importing module {path_or_module} failed with ModuleNotFoundError: {err}; "
            f"fix: install the missing package"
        ) from err
    except Exception as err:
        raise ConfigError(
            f"reward.custom.path: importing module {path_or_module} failed with {type(err).__name__}: {err}; "
            f"fix that error in the module"
        ) from err


def _detect_style(params: Mapping[str, inspect.Parameter], where: str) -> str:
    if {"solution_str", "ground_truth"} <= set(params):
        return "verl"
    if "completions" in params:
        return "trl"
    raise ConfigError(
        f"reward.custom.style: cannot tell whether {where} is TRL-style "
        f"fn(prompts, completions, completion_ids, **kwargs) or verl-style "
        f"compute_score(data_source, solution_str, ground_truth, extra_info=None); "
        f"fix: set reward.custom.style=trl or reward.custom.style=verl"
    )


class CustomRewardTerm:
    """A user reward function adapted to the term signature ``fn(batch, **kwargs) -> list[float]``.

    A class rather than a closure so that a registered term can be re-pointed at a reloaded file.
    """

    def __init__(self, fn: Callable, *, style: str, name: str, source: str, timeout_s: float | None = None) -> None:
        self.fn, self.style, self.name, self.source = fn, style, name, source
        self.timeout_s = timeout_s  # reward.custom.timeout_s: one call (a TRL batch, a verl completion)
        params = inspect.signature(fn).parameters
        self._param_names = frozenset(params)
        self._takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._warned_none = False
        if style == "verl":
            self._verl_by_keyword = {"solution_str", "ground_truth"} <= self._param_names
            self._verl_arity = 0 if self._verl_by_keyword else self._positional_arity()

    @property
    def where(self) -> str:
        return f"{self.name}() in {self.source}"

    def _positional_arity(self) -> int:
        sig = inspect.signature(self.fn)
        for arity in (4, 3):
            try:
                sig.bind(*range(arity))
                return arity
            except TypeError:
                continue
        raise ConfigError(
            f"reward.custom: verl-style {self.where} must accept (data_source, solution_str, ground_truth, "
            f"extra_info=None); its signature is {sig}"
        )

    def _invoke(self, batch: RewardBatch, index: int | None, call: Callable[[], Any]) -> Any:
        """One call of the user's function (``index``: the completion of a verl-style call), bounded
        by ``reward.custom.timeout_s``; what it raises becomes one line naming the step and the
        completion. In the main thread the call runs there, under a SIGUSR1 watchdog
        (:func:`_run_with_watchdog`); elsewhere (signal handlers cannot be set) it runs in a daemon
        thread that is abandoned if it times out (Python cannot stop a thread)."""
        which = (f"completion {index} of {len(batch)}" if index is not None else
                 f"completions 0-{len(batch) - 1} (a TRL-style reward scores the batch at once)")
        at = f"training step {batch.step + 1}, {which}"
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = call()
            except Exception as err:  # noqa: BLE001 -- reported below, on one line
                box["error"] = err

        if self.timeout_s is None:
            run()
        else:
            if threading.current_thread() is threading.main_thread():
                on_time = _run_with_watchdog(run, self.timeout_s, self.name)
            else:
                thread = threading.Thread(target=run, name=f"rlspec-reward-{self.name}", daemon=True)
                thread.start()
                thread.join(self.timeout_s)
                on_time = not thread.is_alive()
            if not on_time:
                raise TrainingError(f"reward.custom: {self.where} did not return within reward.custom.timeout_s="
                                    f"{self.timeout_s:g} s ({at}); fix the function or raise reward.custom.timeout_s")
        err = box.get("error")
        if isinstance(err, RLSpecError):
            raise err
        if err is not None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise TrainingError(f"reward.custom: {self.where} raised {type(err).__name__}"
                                f"{': ' + first if first else ''} ({at}); fix the function") from err
        return box["value"]

    def __call__(self, batch: RewardBatch, **kwargs: Any) -> list[float]:
        values = self._call_trl(batch, kwargs) if self.style == "trl" else self._call_verl(batch, kwargs)
        missing = sum(v is None for v in values)
        if missing:  # TRL's "no reward for this sample"; said loudly once, then quietly
            log = logger.debug if self._warned_none else logger.warning
            log("reward.custom: %s returned None for %d of %d completions; counted as 0.0",
                self.where, missing, len(values))
            self._warned_none = True
        return [0.0 if v is None else v for v in values]

    def _call_trl(self, batch: RewardBatch, extra: dict[str, Any]) -> list[Any]:
        inputs: dict[str, Any] = dict(batch.columns)  # reward inputs below win over same-named columns
        inputs.update(
            prompts=batch.prompts,
            completions=batch.completions,
            completion_ids=batch.completion_ids,
            answer=batch.answers,
            finish_reasons=batch.finish_reasons,
            correct=batch.correct,
            group_ids=batch.group_ids,
            step=batch.step,
        )
        inputs.update(extra)
        if not self._takes_var_kwargs:
            inputs = {k: v for k, v in inputs.items() if k in self._param_names}
        try:
            inspect.signature(self.fn).bind(**inputs)
        except TypeError as err:
            raise ConfigError(
                f"reward.custom: cannot call TRL-style {self.where}: {err}; it is called with keyword "
                f"arguments prompts, completions, completion_ids, answer, finish_reasons, correct, group_ids, "
                f"step and the dataset columns ({', '.join(sorted(batch.columns)) or 'none'}); fix its signature"
            ) from None
        values = self._invoke(batch, None, lambda: self.fn(**inputs))
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
            raise ConfigError(
                f"reward.custom: {self.where} returned a {type(values).__name__}; fix: a TRL-style reward "
                f"returns a list with one float (or None) per completion"
            )
        if len(values) != len(batch):
            raise ConfigError(
                f"reward.custom: {self.where} returned {len(values)} values for {len(batch)} completions; "
                f"fix: return one float (or None) per completion"
            )
        return [self._number(v, i) for i, v in enumerate(values)]

    def _call_verl(self, batch: RewardBatch, extra: dict[str, Any]) -> list[Any]:
        if extra:
            raise ConfigError(
                f"reward.custom: verl-style {self.where} takes no extra kwargs, got {sorted(extra)}; fix: remove them"
            )
        out = []
        for i in range(len(batch)):
            data_source = batch.columns["data_source"][i] if "data_source" in batch.columns else "rlspec"
            info = batch.columns.get("extra_info", [None] * len(batch))[i]
            extra_info = dict(info) if isinstance(info, Mapping) else {}
            for key, values in batch.columns.items():
                if key not in ("data_source", "extra_info"):
                    extra_info.setdefault(key, values[i])
            extra_info.update(index=i, prompt=batch.prompts[i], finish_reason=batch.finish_reasons[i],
                              correct=batch.correct[i], group_id=batch.group_ids[i], step=batch.step)
            args = (data_source, batch.completions[i], batch.answers[i], extra_info)
            if self._verl_by_keyword:
                call = dict(zip(("data_source", "solution_str", "ground_truth", "extra_info"), args))
                if not self._takes_var_kwargs:
                    call = {k: v for k, v in call.items() if k in self._param_names}
                value = self._invoke(batch, i, lambda: self.fn(**call))  # noqa: B023 -- called at once
            else:
                value = self._invoke(batch, i, lambda: self.fn(*args[: self._verl_arity]))  # noqa: B023
            if isinstance(value, Mapping):
                if "score" not in value:
                    raise ConfigError(
                        f"reward.custom: {self.where} returned a dict without 'score' (keys: {sorted(value)}); "
                        f"fix: return a float or a dict with a 'score' entry"
                    )
                value = value["score"]
            out.append(self._number(value, i))
        return out

    def _number(self, value: Any, index: int) -> float | None:
        if value is None:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"reward.custom: {self.where} returned {value!r} for completion {index}; fix: return a float"
            ) from None


def load_custom_reward(path_or_module: str, name: str, *, style: str = "auto",
                       timeout_s: float | None = None) -> CustomRewardTerm:
    """Load ``name`` from a ``.py`` file or a dotted module and wrap it as a reward term.

    Raises:
        ConfigError: missing file/module, an import error, no function ``name``, a signature
            that fits neither style, or an unknown ``style`` -- one line naming the file, the
            function and the fix.
    """
    if style not in STYLES:
        raise ConfigError(f"reward.custom.style must be one of {', '.join(STYLES)}, got {style!r}")
    module, source = _load_module(str(path_or_module))
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        functions = sorted(
            attr for attr, value in vars(module).items()
            if inspect.isfunction(value) and not attr.startswith("_") and value.__module__ == module.__name__
        )
        what = "no function" if fn is None else "a non-callable"
        raise ConfigError(
            f"reward.custom.name: {source} has {what} {name!r} (functions there: {', '.join(functions) or 'none'}); "
            f"fix: set reward.custom.name to the reward function's name"
        )
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ConfigError(f"reward.custom.name: cannot read the signature of {name} in {source}") from None
    if style == "auto":
        style = _detect_style(params, f"{name}() in {source}")
    return CustomRewardTerm(fn, style=style, name=name, source=source, timeout_s=timeout_s)


def register_custom_reward(path_or_module: str, name: str, *, style: str = "auto",
                           timeout_s: float | None = None) -> str:
    """Load a user reward and register it in :data:`REWARD_TERMS`; returns its term name.

    The name is ``"custom:<name>"``. Loading the same name again (e.g. a re-run in a notebook)
    re-points the registered term at the newly loaded function.
    """
    term = load_custom_reward(path_or_module, name, style=style, timeout_s=timeout_s)
    key = CUSTOM_PREFIX + name
    if key in REWARD_TERMS:
        existing = REWARD_TERMS.get(key)
        if not isinstance(existing, CustomRewardTerm):
            raise ConfigError(f"reward term {key!r} is already registered by rlspec; fix: rename the function")
        existing.__dict__.update(term.__dict__)
    else:
        REWARD_TERMS.register(key)(term)
    return key


def build_reward_terms(reward: Any, hbpo: Any = None) -> dict[str, dict[str, Any]]:
    """The ``reward`` config as the ``terms`` mapping of :func:`~rlspec.rewards.compute_rewards`.

    ``reward`` has ``terms`` (``{name: {weight, kwargs}}``) and optionally ``custom`` (``path``,
    ``name``, ``weight``, ``style``), as attributes (``rlspec.config.RewardConfig``) or keys
    (a dict / DictConfig). The custom function is loaded and registered as ``custom:<name>``.
    Everything is checked here, before any model is loaded: unknown term names, weights,
    kwargs that do not fit a term's signature, the custom file and function.

    HBPO's constants live in the config's ``hbpo`` section (shared with its prefill and advantage):
    with ``hbpo`` given, they become the ``hbpo`` term's kwargs.

    Returns plain ``{name: {"weight": float, "kwargs": dict}}``.
    """

    def get(obj: Any, key: str, default: Any = None) -> Any:
        if isinstance(obj, Mapping):
            return obj.get(key, default)
        return getattr(obj, key, default)

    resolved: dict[str, dict[str, Any]] = {}
    for name, spec in (get(reward, "terms") or {}).items():
        term = REWARD_TERMS.get(name)  # an unknown name fails here, listing the valid ones
        weight, kwargs = _term_spec(name, spec)
        check_term_kwargs(name, term, kwargs)
        resolved[name] = {"weight": weight, "kwargs": kwargs}
    custom = get(reward, "custom")
    if custom is not None and get(custom, "path"):
        if not get(custom, "name"):
            raise ConfigError("reward.custom.name is not set; fix: set it to the reward function's name")
        key = register_custom_reward(
            str(get(custom, "path")), str(get(custom, "name")), style=str(get(custom, "style", "auto")),
            timeout_s=get(custom, "timeout_s"),
        )
        weight, _ = _term_spec("custom", {"weight": get(custom, "weight", 1.0)})
        resolved[key] = {"weight": weight, "kwargs": {}}
    if "hbpo" in resolved and hbpo is not None:
        resolved["hbpo"]["kwargs"] = {k: get(hbpo, k) for k in ("variant", "l_max", "beta", "alpha")}
    return resolved
