"""A small name -> class registry, filled by decorators (as lm-eval registers models and tasks),
and extended from outside the package without editing it:

- `path/to/file.py:ClassName`  a class in a file of the user's (imported once per process);
- `package.module:ClassName`   a class in an importable module;
- an entry point in the registry's group (`streambench.policies`, `streambench.tasks`), as pytest
  and lm-eval find plugins; loaded lazily, when its name is first asked for or listed.

A plugin must subclass the registry's base class. Every entry knows where it came from
(`origin`): results of plugin entries record it (module or file with its sha256, distribution and
version), so a result says exactly what ran. Entries are classes, never shared instances: each run
builds its own object from validated args.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from streambench.errors import ConfigError, StreambenchError, UnknownNameError

T = TypeVar("T", bound=type)
BUILTIN = {"kind": "builtin"}
_REGISTRIES: list[Registry] = []  # every registry, for plugin_fault


class PluginError(ConfigError):
    """A plugin that cannot be found, imported or used (one line, exit 2)."""


def is_reference(name: str) -> bool:
    """`file.py:Class` or `package.module:Class` (an entry's name never holds a colon)."""
    return isinstance(name, str) and ":" in name


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _distribution_of(module_name: str) -> dict:
    top = module_name.split(".")[0]
    names = importlib.metadata.packages_distributions().get(top, [])
    if not names:
        return {}
    try:
        return {"distribution": names[0], "version": importlib.metadata.version(names[0])}
    except importlib.metadata.PackageNotFoundError:
        return {"distribution": names[0]}


def _import_file(path: Path):
    digest = file_sha256(path)
    module_name = f"streambench_plugin_{path.stem}_{digest[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name], digest
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a plugin cannot end streambench, not even at import
        del sys.modules[module_name]
        raise PluginError(f"plugin {path} failed to import: {_described(exc)}") from None
    return module, digest


def _described(exc: BaseException) -> str:
    """`ValueError: text`; the type alone when the text is empty (`raise NotImplementedError`)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) (a plugin cannot end streambench)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _source(cls: type) -> str | None:
    module = sys.modules.get(getattr(cls, "__module__", ""))
    path = getattr(module, "__file__", None)
    return os.path.abspath(path) if path else None


def plugin_fault(exc: BaseException) -> PluginError | None:
    """An exception (or SystemExit) raised by a plugin's own code, as one line naming the plugin,
    the method streambench called and what it raised; None when no plugin code is on the
    traceback (a streambench bug stays one). The outermost frame in a plugin's file is the method
    the engine called; its `self` says which plugin when one file holds several."""
    owners: dict[type, tuple[str, str]] = {}
    files: dict[str, tuple[str, str]] = {}
    for registry in _REGISTRIES:
        for name, cls in registry._entries.items():
            if registry._origins.get(name, BUILTIN) is BUILTIN:
                continue
            if isinstance(exc, StreambenchError) and f"{registry.kind} {name}" in str(exc):
                return None  # already one line naming it (a bridged class's own check, e.g. kvpress's)
            owners.setdefault(cls, (registry.kind, name))
            source = _source(cls)
            if source is not None:
                files.setdefault(source, (registry.kind, name))
    tb = exc.__traceback__
    while files and tb is not None:
        frame = tb.tb_frame
        found = files.get(os.path.abspath(frame.f_code.co_filename))
        if found is not None:
            owner = frame.f_locals.get("self")
            if owner is not None:
                found = next((owners[c] for c in type(owner).__mro__ if c in owners), found)
            kind, name = found
            method = frame.f_code.co_name
            where = "at import" if method == "<module>" else f"in {method}()"
            return PluginError(f"{kind} plugin '{name}' failed {where}: {_described(exc)}")
        tb = tb.tb_next
    return None


class Registry(Generic[T]):
    def __init__(
        self,
        kind: str,
        base: type | None = None,
        group: str | None = None,
        check: Callable[[type], None] | None = None,
        adapters: dict[str, tuple[Callable[[], Any], Callable[[Any], type | None]]] | None = None,
    ):
        self.kind = kind
        # foreign libraries whose classes become entries: top-level module -> (import it, turn one
        # of its classes into a subclass of `base` or None); e.g. kvpress presses as policies
        self.adapters = adapters or {}
        self.base = base
        self.check = check  # validates a class's declarations when it registers (raises ConfigError)
        self.group = group  # entry-point group plugins register under
        self._entries: dict[str, T] = {}
        self._origins: dict[str, dict] = {}
        self._entry_points: dict[str, Any] | None = None  # {name: EntryPoint}, read once, lazily
        _REGISTRIES.append(self)

    def register(self, *names: str, origin: dict | None = None) -> Callable[[T], T]:
        def decorate(cls: T) -> T:
            if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
                what = cls.__name__ if isinstance(cls, type) else repr(cls)
                raise TypeError(f"{what} must subclass {self.base.__name__} to be a {self.kind}")
            if self.check is not None and isinstance(cls, type):
                probe: Any = cls
                probe.name = probe.__dict__.get("name") or names[0]  # named in the check's message
                self.check(cls)
            for name in names:
                if name in self._entries and self._entries[name] is not cls:
                    raise ValueError(f"{self.kind} name '{name}' is already taken by {self._entries[name].__name__}")
                self._entries[name] = cls
                self._origins[name] = origin or BUILTIN
            if not cls.__dict__.get("name"):  # a subclass does not inherit its parent's name
                cls.name = names[0]  # type: ignore[attr-defined]  # every registered base declares `name`
            return cls

        return decorate

    # ---- plugins -------------------------------------------------------------------------------
    def _plugin_entry_points(self) -> dict[str, Any]:
        if self._entry_points is None:
            found = importlib.metadata.entry_points(group=self.group) if self.group else []
            self._entry_points = {ep.name: ep for ep in found}
        return self._entry_points

    def _adopt(self, name: str, obj: Any, origin: dict, where: str) -> T:
        if self.adapters and isinstance(obj, type) and not (self.base is not None and issubclass(obj, self.base)):
            tops = {str(getattr(k, "__module__", "") or "").split(".")[0] for k in obj.__mro__}
            for top in sorted(tops & set(self.adapters)):  # (a class of that library, or one built on it)
                adapted = self.adapters[top][1](obj)
                if adapted is not None:
                    obj = adapted
                    break
        if not (isinstance(obj, type) and self.base is not None and issubclass(obj, self.base)):
            base = getattr(self.base, "__name__", "its base class")
            raise PluginError(f"{where} is not a {self.kind}: it must be a class subclassing {base}")
        cls: Any = obj  # a subclass of the registry's base, which declares `name`
        if cls is self.base:
            raise PluginError(
                f"{where} is streambench's base class itself: a {self.kind} plugin subclasses {cls.__name__}"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise PluginError(f"{where} is abstract: it does not implement {missing}")
        known = next((n for n, c in self._entries.items() if c is cls), None)
        if known is not None:  # renaming it would rename the entry (and every result) it already is
            raise PluginError(f"{where} is the {self.kind} already known as '{known}': name it '{known}'")
        if self.check is not None:
            try:
                self.check(cls)
            except ConfigError as exc:
                raise PluginError(f"{where}: {exc}") from None
        cls.name = name  # the name it was found by is the name results record and reruns resolve
        self._entries[name] = cls
        self._origins[name] = origin
        return cls

    def _load_reference(self, name: str) -> T:
        target, _, attr = name.rpartition(":")
        if not target or not attr.isidentifier():
            raise PluginError(f"{self.kind} '{name}': expected path/to/file.py:ClassName or package.module:ClassName")
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser()
            if not path.is_file():
                raise PluginError(f"{self.kind} plugin file not found: {target}")
            module, digest = _import_file(path)
            origin = {"kind": "file", "path": str(path.resolve()), "sha256": digest, "class": attr}
        else:
            try:
                top = target.split(".")[0]
                module = self.adapters[top][0]() if top in self.adapters else importlib.import_module(target)
                if top in self.adapters and target != top:
                    module = importlib.import_module(target)
            except ConfigError:
                raise
            except (Exception, SystemExit) as exc:
                raise PluginError(f"{self.kind} plugin module {target!r} failed to import: {_described(exc)}") from None
            origin = {"kind": "module", "module": target, "class": attr, **_distribution_of(target)}
            source = getattr(module, "__file__", None)
            if source and Path(source).is_file():
                origin["sha256"] = file_sha256(Path(source))
        if not hasattr(module, attr):
            raise PluginError(f"{self.kind} plugin {target} has no {attr!r}")
        return self._adopt(name, getattr(module, attr), origin, name)

    def _load_entry_point(self, name: str) -> T:
        ep = self._plugin_entry_points()[name]
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:
            raise PluginError(f"{self.kind} plugin '{name}' ({ep.value}) failed to load: {_described(exc)}") from None
        origin = {"kind": "entry-point", "group": self.group, "value": ep.value}
        if ep.dist is not None:
            origin.update(distribution=ep.dist.name, version=ep.dist.version)
        return self._adopt(name, obj, origin, f"entry point '{name}' ({ep.value})")

    def _lookup(self, name: str) -> T | None:
        if not isinstance(name, str):
            return None
        if name in self._entries:
            return self._entries[name]
        if is_reference(name):
            return self._load_reference(name)
        if name in self._plugin_entry_points():
            return self._load_entry_point(name)
        return None

    # ---- lookups ---------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        found = self._lookup(name)
        if found is not None:
            return found
        close = difflib.get_close_matches(str(name), self._entries, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} '{name}'{hint} (known: {', '.join(self.names())})") from None

    def origin(self, name: str) -> dict:
        self.get(name)
        return self._origins[name]

    def load_plugins(self) -> dict[str, str]:
        """Load every entry-point plugin (for `streambench list`); {name: error} for broken ones."""
        broken = {}
        for name in self._plugin_entry_points():
            if name not in self._entries:
                try:
                    self._load_entry_point(name)
                except PluginError as exc:
                    broken[name] = str(exc)
        return broken

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return self._lookup(name) is not None
