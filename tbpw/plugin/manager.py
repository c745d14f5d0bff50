"""The plugin manager: built-ins and third parties both come in through the `tbpw` entry-point group.

tbpw's own subcommands are internal plugins (registered by module, as tox registers its internal
plugins); everything else, the built-in allocators, metrics, datasets and evaluators included, is an
entry point. Entry points are loaded when the manager is first asked for something, and each kind's
registry is collected on first use, so starting the command line imports no plugin's heavy code.

Set TBPW_BLOCK_PLUGINS to a comma-separated list of entry-point names to skip them (a broken
third-party plugin then cannot stop tbpw from starting).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pluggy
from pydantic import BaseModel, ValidationError

from tbpw.errors import TbpwError
from tbpw.plugin import hookspecs
from tbpw.plugin.base import PLUGIN_BASES, Plugin

if TYPE_CHECKING:
    import click

ENTRY_POINT_GROUP = "tbpw"
BLOCK_ENV = "TBPW_BLOCK_PLUGINS"
# tbpw's own subcommands, each a module with a tbpw_register_commands hook (like a plugin's).
INTERNAL_PLUGINS = ("tbpw.cli.build", "tbpw.cli.doctor", "tbpw.cli.plugins", "tbpw.cli.data", "tbpw.cli.imatrix",
                    "tbpw.cli.measure", "tbpw.cli.quantize", "tbpw.cli.choose", "tbpw.cli.recipes",
                    "tbpw.cli.inspect", "tbpw.cli.sweep")

T = TypeVar("T", bound=Plugin)


@dataclass(frozen=True)
class Registered(Generic[T]):
    cls: type[T]
    plugin: str  # the pluggy plugin (entry point) that registered it


class Registry(Generic[T]):
    """Plugins of one kind by name, with helpful errors for unknown names and bad options."""

    def __init__(self, kind: str, base: type[T]):
        self.kind = kind
        self.base = base
        self._items: dict[str, Registered[T]] = {}

    def add(self, cls: type[T], plugin: str) -> None:
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            what = getattr(cls, "__name__", repr(cls))
            raise TbpwError(f"plugin {plugin} registered {what} as a {self.kind}, but it does not subclass "
                            f"tbpw.{self.base.__name__}: derive it from that base class")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TbpwError(f"plugin {plugin} registered a {self.kind} without a `name` attribute: give the class a name")
        if not isinstance(getattr(cls, "Options", None), type) or not issubclass(cls.Options, BaseModel):
            raise TbpwError(f"{self.kind} {name!r} from plugin {plugin} has no pydantic `Options` model: add one (NoOptions if it takes none)")
        if name in self._items:
            other = self._items[name].plugin
            raise TbpwError(f"{self.kind} {name!r} is registered twice (by {other} and by {plugin}): rename one or block a plugin with {BLOCK_ENV}")
        self._items[name] = Registered(cls, plugin)

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

    def default_name(self) -> str:
        """The plugin of this kind marked `default = True` (what a recipe gets when it names none)."""
        marked = [r.cls.name for r in self if r.cls.default]
        if len(marked) != 1:
            why = f"{' and '.join(marked)} both claim to be" if marked else "no plugin is"
            raise TbpwError(f"{why} the default {self.kind}: name the {self.kind} in the recipe")
        return marked[0]

    def plugin_of(self, name: str) -> str:
        self.get(name)
        return self._items[name].plugin

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
    """pluggy's manager plus one registry per plugin kind, each collected on first use."""

    KINDS = {"allocator": "tbpw_register_allocators", "metric": "tbpw_register_metrics",
             "dataset": "tbpw_register_datasets", "evaluator": "tbpw_register_evaluators",
             "executor": "tbpw_register_executors"}

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.versions: dict[str, str] = {}
        self._registries: dict[str, Registry] = {}
        self._commands: dict[str, click.Command] | None = None
        for module in INTERNAL_PLUGINS:
            self.pm.register(importlib.import_module(module), name=module)
            self.versions[module] = "internal"
        if load_entry_points:
            self._load_entry_points()
        self._check_pending()

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked_plugins() or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise TbpwError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}; fix it or set {BLOCK_ENV}={ep.name}") from exc
            self.pm.register(module, name=ep.name)
            self.versions[ep.name] = ep.dist.version if ep.dist else "?"

    def _check_pending(self) -> None:
        """A hook implementation whose name matches no hook (a misspelling) is an error, not silence."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            found = re.search(r"unknown hook '([^']+)'", str(exc))
            hook = found.group(1) if found else "?"
            plugin = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            close = difflib.get_close_matches(hook, [h for h in dir(hookspecs) if h.startswith("tbpw_")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TbpwError(f"plugin {plugin!r} implements {hook!r}, which is not a tbpw hook{hint}: "
                            f"fix the name, or block the plugin with {BLOCK_ENV}={plugin}") from exc

    def registry(self, kind: str) -> Registry:
        if kind not in self._registries:
            registry: Registry = Registry(kind, PLUGIN_BASES[kind])
            for impl in getattr(self.pm.hook, self.KINDS[kind]).get_hookimpls():
                impl.function(register=lambda cls, _p=impl.plugin_name: registry.add(cls, _p))
            self._registries[kind] = registry
        return self._registries[kind]

    @property
    def registries(self) -> dict[str, Registry]:
        return {kind: self.registry(kind) for kind in self.KINDS}

    def commands(self) -> dict[str, click.Command]:
        """Every subcommand, tbpw's own and the plugins', by name."""
        if self._commands is None:
            import click

            collector = click.Group()
            self.pm.hook.tbpw_register_commands(cli=collector)
            self._commands = dict(collector.commands)
        return self._commands

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin object at run time (tests, notebooks); returns its name."""
        plugin_name = self.pm.register(plugin, name=name)
        assert plugin_name is not None
        self._forget()
        self._check_pending()
        _ = self.registries  # a bad registration fails here, at once, not at first use
        return plugin_name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._forget()

    def _forget(self) -> None:
        self._registries.clear()
        self._commands = None

    def allocators(self) -> Registry:
        return self.registry("allocator")

    def metrics(self) -> Registry:
        return self.registry("metric")

    def datasets(self) -> Registry:
        return self.registry("dataset")

    def evaluators(self) -> Registry:
        return self.registry("evaluator")

    def executors(self) -> Registry:
        return self.registry("executor")

    def describe(self) -> list[dict[str, Any]]:
        """One row per plugin: its name, version, hooks and what it registered (tbpw's own commands left out)."""
        registries = self.registries
        rows = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if name in INTERNAL_PLUGINS:
                continue
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            provides = {kind: [r.cls.name for r in reg if r.plugin == name] for kind, reg in registries.items()}
            rows.append({"name": name, "version": self.versions.get(name, "-"), "hooks": hooks,
                         "provides": {k: v for k, v in provides.items() if v}})
        return rows


def blocked_plugins() -> set[str]:
    return {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_manager() -> None:
    global _manager
    _manager = None
