"""The plugin manager: built-ins and third parties both come in through the `tbpw` entry-point group.

Set TBPW_BLOCK_PLUGINS to a comma-separated list of entry-point names to skip them (a broken
third-party plugin then cannot stop tbpw from starting).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .errors import TbpwError

ENTRY_POINT_GROUP = "tbpw"
BLOCK_ENV = "TBPW_BLOCK_PLUGINS"

T = TypeVar("T")


@dataclass(frozen=True)
class Registered(Generic[T]):
    cls: type[T]
    plugin: str  # the pluggy plugin (entry point) that registered it


class Registry(Generic[T]):
    """Plugins of one kind by name, with helpful errors for unknown names and bad options."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Registered[T]] = {}

    def add(self, cls: type[T], plugin: str) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TbpwError(f"plugin {plugin} registered a {self.kind} without a `name` attribute: give the class a name")
        if not isinstance(getattr(cls, "Options", None), type) or not issubclass(cls.Options, BaseModel):
            raise TbpwError(f"{self.kind} {name!r} from plugin {plugin} has no pydantic `Options` model: add one (NoOptions if it takes none)")
        if name in self._items:
            other = self._items[name].plugin
            raise TbpwError(f"{self.kind} {name!r} is registered twice (by {other} and by {plugin}): rename one or block a plugin with {BLOCK_ENV}")
        self._items[name] = Registered(cls, plugin)

    def remove_plugin(self, plugin: str) -> None:
        for name in [n for n, r in self._items.items() if r.plugin == plugin]:
            del self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[Registered[T]]:
        return iter(self._items[n] for n in self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> type[T]:
        if name not in self._items:
            raise TbpwError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name].cls

    def validate_options(self, name: str, options: dict[str, Any] | None) -> BaseModel:
        cls = self.get(name)
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as exc:
            raise TbpwError(options_error_message(self.kind, name, cls.Options, exc)) from exc

    def create(self, name: str, options: dict[str, Any] | BaseModel | None = None) -> T:
        validated = options if isinstance(options, BaseModel) else self.validate_options(name, options)
        return self.get(name)(validated)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}:{hint} known {kind}s: {', '.join(known) or 'none'}"


def options_error_message(kind: str, name: str, model: type[BaseModel], exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "options"
    fields = ", ".join(model.model_fields) or "none"
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), list(model.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{kind} {name!r} has no option {where!r}{hint}; its options are: {fields}"
    return f"{kind} {name!r} option {where!r}: {first['msg']}; its options are: {fields}"


class PluginManager:
    """pluggy's manager plus one registry per plugin kind."""

    KINDS = {"allocator": "tbpw_register_allocators", "metric": "tbpw_register_metrics",
             "dataset": "tbpw_register_datasets", "evaluator": "tbpw_register_evaluators"}

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in self.KINDS}
        self.versions: dict[str, str] = {}
        if load_entry_points:
            self._load_entry_points()
        self._collect_all()

    def _load_entry_points(self) -> None:
        blocked = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise TbpwError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}; fix it or set {BLOCK_ENV}={ep.name}") from exc
            self.pm.register(module, name=ep.name)
            self.versions[ep.name] = ep.dist.version if ep.dist else "?"

    def _collect_all(self) -> None:
        for registry in self.registries.values():
            registry._items.clear()
        for kind, hook in self.KINDS.items():
            registry = self.registries[kind]
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                impl.function(register=lambda cls, _p=impl.plugin_name: registry.add(cls, _p))

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin object at run time (tests, notebooks); returns its name."""
        plugin_name = self.pm.register(plugin, name=name)
        assert plugin_name is not None
        self._collect_all()
        return plugin_name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._collect_all()

    def allocators(self) -> Registry:
        return self.registries["allocator"]

    def metrics(self) -> Registry:
        return self.registries["metric"]

    def datasets(self) -> Registry:
        return self.registries["dataset"]

    def evaluators(self) -> Registry:
        return self.registries["evaluator"]

    def describe(self) -> list[dict[str, Any]]:
        """One row per plugin: its name, version, hooks and what it registered."""
        rows = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            provides = {kind: [r.cls.name for r in reg if r.plugin == name] for kind, reg in self.registries.items()}
            rows.append({"name": name, "version": self.versions.get(name, "-"), "hooks": hooks,
                         "provides": {k: v for k, v in provides.items() if v}})
        return rows


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_manager() -> None:
    global _manager
    _manager = None
