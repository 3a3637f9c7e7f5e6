"""A tiny name -> factory registry: models, datasets, attacks and defenses are reachable by name.

A factory's typed signature is also the schema of its options: `check_options` validates a
config's `model.options` / `data.options` against it, so a bad option is a one-line error that
names its key before anything is built.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from vptlab.errors import ConfigError, RegistryError, format_validation_error

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories: `register("name", **metadata)(factory)`, `create(name, **kwargs)`,
    `names(**filters)`, `meta(name)`.

    Metadata are what a caller needs to know about an entry without building it (timm's model
    tags): `names(repairs_pixel_prompts=True)` lists the entries whose metadata say so. A
    registry built with `required=(...)` refuses an entry that does not state each of those keys.
    """

    def __init__(self, kind: str, required: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.required = required
        self._factories: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(
        self, name: str, **metadata: Any
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        missing = [key for key in self.required if key not in metadata]
        if missing:
            raise ValueError(f"{self.kind} '{name}' is registered without {', '.join(missing)}")

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            self._meta[name] = dict(metadata)
            return factory

        return decorator

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata `name` was registered with (a copy)."""
        self.get(name)  # an unknown name is the usual one-line error
        return dict(self._meta[name])

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} '{name}'; choose from: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self, **filters: Any) -> list[str]:
        """The registered names, sorted; with `filters`, those whose metadata hold every value
        (a key an entry did not state never matches)."""
        return sorted(
            name
            for name, meta in self._meta.items()
            if all(key in meta and meta[key] == value for key, value in filters.items())
        )

    def require(self, name: str, where: str) -> None:
        """A ConfigError naming `where` (the config key) unless `name` is registered."""
        if name not in self._factories:
            raise ConfigError(
                f"{where}: unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}"
            )

    def check_options(
        self,
        name: str,
        options: Mapping[str, Any],
        where: str,
        supplied: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`options` validated against factory `name`'s signature; see `check_factory_options`."""
        return check_factory_options(
            self.get(name), options, where=where, owner=f"{self.kind} '{name}'", supplied=supplied
        )

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_plugins(package: str, path: Iterable[str]) -> None:
    """Import every module of `package` (its `__path__`), so that each registers its entries:
    adding a plug-in is one file with its `@REGISTRY.register(...)` line, no import to add."""
    for module in pkgutil.iter_modules(path, prefix=f"{package}."):
        importlib.import_module(module.name)


def check_factory_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    where: str,
    owner: str,
    supplied: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The keyword options for `factory`, each checked against its parameter's type annotation.

    `where` is the options' key path (`model.options`) and `owner` names the factory in messages
    (`model 'simplenet'`); `supplied` maps the parameters the caller passes itself to a hint of
    where a user sets them instead (`img_size` -> "set it as data.img_size"). Unknown options are
    an error unless the factory takes **kwargs (timm models: timm judges those). Returns the
    options as validated, in their JSON form (`drop_rate: 1` -> 1.0), so that what is saved in a
    run's config is what the factory received.
    """
    supplied = supplied or {}
    params = _parameters(factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n: p
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    checked: dict[str, Any] = {}
    for key, value in options.items():
        path = f"{where}.{key}"
        if key in supplied:
            raise ConfigError(f"{path}: not an option here; {supplied[key]}")
        param = named.get(key)
        if param is None:
            if not takes_any:
                allowed = ", ".join(n for n in named if n not in supplied) or "none"
                raise ConfigError(f"{path}: unknown option; {owner} takes: {allowed}")
            checked[key] = value
            continue
        checked[key] = _validate(param.annotation, value, path)
    return checked


def _parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    # Our modules use `from __future__ import annotations`: the annotations are strings until
    # evaluated. One that cannot be evaluated is left unchecked rather than failing the config.
    try:
        return inspect.signature(factory, eval_str=True).parameters
    except Exception:  # any failure to evaluate means: no types to check
        return inspect.signature(factory).parameters


@functools.lru_cache(maxsize=256)
def _adapter(annotation: Any) -> TypeAdapter[Any] | None:
    try:
        return TypeAdapter(annotation)
    except Exception:  # a type pydantic cannot check (a module, say)
        return None


def _validate(annotation: Any, value: Any, path: str) -> Any:
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return value
    try:
        adapter = _adapter(annotation)
    except TypeError:  # an unhashable annotation object: build it uncached
        adapter = _adapter.__wrapped__(annotation)
    if adapter is None:
        return value
    try:
        validated = adapter.validate_python(value)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, at=path)) from None
    try:
        return adapter.dump_python(validated, mode="json")
    except Exception:  # a value with no JSON form: hand it over as validated
        return validated
