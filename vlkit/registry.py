"""One registry per component family.

In-tree components register with a decorator; third-party packages add components through Python entry points
(groups ``vlkit.encoders``, ``vlkit.token_strategies``, ``vlkit.projectors``, ``vlkit.llms``). Discovery runs in
two phases, as flake8 and pluggy do: *find* reads entry-point metadata only (cheap, never imports the plugin),
*load* imports a plugin the first time one of its components is used. A plugin that fails to import is reported
with its entry-point name, distribution and version and the original error chained; it only breaks the commands
that use it. ``VLKIT_DISABLE_PLUGIN_AUTOLOAD=1`` turns discovery off.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

DISABLE_ENV = "VLKIT_DISABLE_PLUGIN_AUTOLOAD"


class RegistryError(LookupError):
    """An unknown, clashing or broken component."""


class PluginLoadError(RegistryError):
    """A third-party plugin could not be imported."""


def suggest(name: str, choices: list[str] | tuple[str, ...] | Any) -> str:
    """' Did you mean 'x'?' for the nearest choice, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


@dataclass
class Entry:
    """One component known to a registry."""

    name: str
    source: str  # "built-in" or "<distribution> <version>"
    factory: Callable[..., Any] | None = None
    entry_point: metadata.EntryPoint | None = None
    error: str | None = None  # import error of a broken plugin, or a name clash
    clashes: list[str] = field(default_factory=list)

    @property
    def is_plugin(self) -> bool:
        return self.entry_point is not None


class Registry:
    """Components of one family: ``register`` (decorator), ``create``, ``list``, ``get``."""

    def __init__(self, family: str, group: str, builtin_module: str) -> None:
        self.family = family  # e.g. "projector"
        self.group = group  # entry-point group, e.g. "vlkit.projectors"
        self._builtin_module = builtin_module
        self._builtins: dict[str, Entry] = {}
        self._plugins: dict[str, Entry] | None = None

    # ---- registration -------------------------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            key = name or factory.__name__
            if key in self._builtins and self._builtins[key].factory is not factory:
                raise RegistryError(f"{self.family} '{key}' is registered twice (in {factory.__module__})")
            self._builtins[key] = Entry(key, "built-in", factory=factory)
            return factory

        return deco

    # ---- discovery ----------------------------------------------------------------------------------------
    def _ensure_builtins(self) -> None:
        importlib.import_module(self._builtin_module)

    def _find_plugins(self) -> dict[str, Entry]:
        """Phase 1: read entry-point metadata (no plugin import)."""
        if self._plugins is not None:
            return self._plugins
        found: dict[str, Entry] = {}
        if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0", "false", "False"):
            self._plugins = found
            return found
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: (e.name, e.value)):
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
            if (ep.name, ep.value) in seen:  # the same dist seen twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            if ep.name in found:
                found[ep.name].clashes.append(source)
                continue
            found[ep.name] = Entry(ep.name, source, entry_point=ep)
        self._plugins = found
        return found

    def refresh(self) -> None:
        """Forget discovered plugins (after installing one in a running process, or in tests)."""
        self._plugins = None

    def entries(self) -> list[Entry]:
        """All components, built-in first, then plugins; plugins are loaded so that broken ones show their error."""
        self._ensure_builtins()
        out = list(self._builtins.values())
        for name in self._find_plugins():
            try:
                self.get(name)
            except RegistryError:
                pass  # the error is kept on the entry and shown by `vlkit list`
            out.append(self._plugins[name])  # type: ignore[index]
        return sorted(out, key=lambda e: (e.is_plugin, e.name))

    def names(self) -> list[str]:
        self._ensure_builtins()
        return sorted(set(self._builtins) | set(self._find_plugins()))

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a glob pattern (``list('vit_*')``)."""
        return [n for n in self.names() if fnmatch.fnmatch(n, pattern)]

    # ---- lookup -------------------------------------------------------------------------------------------
    def get(self, name: str) -> Callable[..., Any]:
        """Phase 2: the factory for ``name``, importing its plugin on first use."""
        self._ensure_builtins()
        plugins = self._find_plugins()
        if name in self._builtins and name in plugins:
            entry = plugins[name]
            entry.error = (
                f"{self.family} '{name}' from plugin {entry.source} clashes with vlkit's built-in of the same name; "
                "rename the entry point"
            )
            raise RegistryError(entry.error)
        if name in self._builtins:
            return self._builtins[name].factory  # type: ignore[return-value]
        if name not in plugins:
            valid = ", ".join(self.names()) or "(none)"
            raise RegistryError(
                f"unknown {self.family} '{name}'.{suggest(name, self.names())} Valid {self.family} names: {valid}"
            )
        entry = plugins[name]
        if entry.clashes:
            entry.error = (
                f"{self.family} '{name}' is provided by more than one package: {entry.source}, "
                f"{', '.join(entry.clashes)}; uninstall one of them"
            )
            raise RegistryError(entry.error)
        if entry.factory is None:
            try:
                entry.factory = entry.entry_point.load()  # type: ignore[union-attr]
            except Exception as exc:  # report any import failure of third-party code, chained
                entry.error = f"{type(exc).__name__}: {exc}"
                raise PluginLoadError(
                    f"{self.family} plugin '{name}' (entry point '{entry.entry_point.value}' in group '{self.group}', "  # type: ignore[union-attr]
                    f"distribution {entry.source}) failed to load: {entry.error}"
                ) from exc
            if not callable(entry.factory):
                entry.error = f"entry point '{entry.entry_point.value}' is not callable"  # type: ignore[union-attr]
                raise PluginLoadError(f"{self.family} plugin '{name}' ({entry.source}): {entry.error}")
        return entry.factory

    def source(self, name: str) -> str:
        self._ensure_builtins()
        if name in self._builtins:
            return "built-in"
        return self._find_plugins()[name].source

    def create(self, name: str, **params: Any) -> Any:
        """Build component ``name`` with ``params``; parameter errors name the component."""
        factory = self.get(name)
        errors = self.check_params(name, params)
        if errors:
            raise RegistryError("; ".join(errors))
        return factory(**params)

    def accepts(self, name: str, key: str) -> bool:
        """Whether component ``name``'s factory takes parameter ``key`` (by name, or through ``**params``)."""
        try:
            sig = inspect.signature(self.get(name))
        except (TypeError, ValueError):
            return True
        return key in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())

    def check_params(self, name: str, params: dict[str, Any]) -> list[str]:
        """Parameters a factory would reject, with suggestions. Factories taking ``**params`` accept anything."""
        factory = self.get(name)
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            return []
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return []
        accepted = [p for p, v in sig.parameters.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
        errors = []
        for key in params:
            if key not in accepted:
                errors.append(
                    f"{self.family} '{name}' has no parameter '{key}'.{suggest(key, accepted)} "
                    f"Its parameters: {', '.join(accepted) or '(none)'}"
                )
        missing = [
            p for p, v in sig.parameters.items()
            if v.default is v.empty and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD) and p not in params
        ]
        for p in missing:
            errors.append(f"{self.family} '{name}' needs parameter '{p}'")
        return errors


ENCODERS = Registry("encoder", "vlkit.encoders", "vlkit.components.encoders")
TOKEN_STRATEGIES = Registry("token strategy", "vlkit.token_strategies", "vlkit.components.tokens")
PROJECTORS = Registry("projector", "vlkit.projectors", "vlkit.components.projectors")
LLMS = Registry("llm", "vlkit.llms", "vlkit.components.llms")
FUSIONS = Registry("fusion", "vlkit.fusions", "vlkit.components.fusion")

FAMILIES: dict[str, Registry] = {
    "encoders": ENCODERS,
    "token_strategies": TOKEN_STRATEGIES,
    "projectors": PROJECTORS,
    "llms": LLMS,
    "fusions": FUSIONS,
}

register_encoder = ENCODERS.register
register_token_strategy = TOKEN_STRATEGIES.register
register_projector = PROJECTORS.register
register_llm = LLMS.register
register_fusion = FUSIONS.register


def create_encoder(name: str, **params: Any) -> Any:
    return ENCODERS.create(name, **params)


def create_token_strategy(name: str, **params: Any) -> Any:
    return TOKEN_STRATEGIES.create(name, **params)


def create_projector(name: str, **params: Any) -> Any:
    return PROJECTORS.create(name, **params)


def create_llm(name: str, **params: Any) -> Any:
    return LLMS.create(name, **params)


def list_encoders(pattern: str = "*") -> list[str]:
    return ENCODERS.list(pattern)


def list_token_strategies(pattern: str = "*") -> list[str]:
    return TOKEN_STRATEGIES.list(pattern)


def list_projectors(pattern: str = "*") -> list[str]:
    return PROJECTORS.list(pattern)


def list_llms(pattern: str = "*") -> list[str]:
    return LLMS.list(pattern)
