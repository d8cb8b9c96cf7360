"""Plugins: more actors, found at start-up and configured by their table.

How this works
--------------
A plugin is an ``Actor`` subclass, normally a ``Plugin``. It is enabled by a
``[plugins.NAME]`` table in the configuration; ``start_plugins`` runs after
the core actors are up and, for every table:

1. Finds the class. ``actor = "module:Class"`` in the table names it
   directly (imported with the configuration file's folder on ``sys.path``,
   for a plugin that is not an installed package); otherwise the entry point
   ``NAME`` of the ``arcology.actors`` group names it (a package declares it
   in its ``pyproject.toml``).
2. Checks the rest of the table against the class's ``Options`` dataclass:
   every key must be a field, every value of the field's type; fields left
   out take their defaults; ``__post_init__`` may refuse a value by raising
   ``ValueError``. The result is handed to the plugin as ``self.options``.
3. Registers the class under ``NAME`` (so ``ai1 call NAME.VERB`` reaches it)
   and starts it with ``Runtime.add``, after the plugins it ``needs``.

What always holds
-----------------
- A plugin that cannot be found or imported, whose table is refused, which
  needs an actor that is not running, or which raises while starting is
  reported with one ERROR line naming it and the reason, and left out. The
  core actors and the other plugins keep running.
- Plugins start after the core actors and so stop before them
  (``Runtime.stop`` stops in reverse start order).
- A plugin that crashes later is restarted by the runtime like any actor:
  a fresh instance, the same options.
- ``Plugin.serve`` gives a plugin its own listener: an ASGI application in
  ``dataplane.port_apps`` and a plain port opened by Esper; ``on_stop``
  closes it, so a crash or a stop never leaves a port answering for a
  plugin that is gone.

- A plugin that crashes more than ``MAX_RESTARTS`` times within
  ``RESTART_WINDOW_S`` is given up on: it stays stopped (``ai1 status``
  shows it ``failed``, one ERROR line says so) and the core goes on serving.
  ``required = true`` in its table makes such a crash storm stop the whole
  process instead, as for a core actor.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from loguru import logger

from arc.actor import Actor
from arc.errors import ArcError, BadInput, ConfigError

if TYPE_CHECKING:
    from arc.config import Config
    from arc.runtime import Runtime

__all__ = [
    "ENTRY_POINT_GROUP",
    "NoOptions",
    "Plugin",
    "find_plugin_class",
    "parse_options",
    "start_plugins",
]

ENTRY_POINT_GROUP = "arcology.actors"
# The table key that names a class directly; never passed on as an option.
ACTOR_KEY = "actor"
# A table key for every plugin: whether its crash storm stops Arcology.
REQUIRED_KEY = "required"
# A plugin's name is the first half of its verbs ("metrics.status"), so it
# follows the same rule as the admin channel's verbs.
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# How long a plugin waits for Esper to open or close its listener.
LISTEN_TIMEOUT_S = 10.0

ASGIApp = Callable[..., Any]
log = logger.bind(actor="plugins")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a plugin that takes none: its table must be empty."""


class Plugin(Actor):
    """The base of a plugin actor: options, and a listener of its own.

    A subclass declares ``Options``, a dataclass whose fields are what its
    ``[plugins.NAME]`` table may hold; the checked instance is
    ``self.options``. Verbs, announcements and ``needs`` work as for any
    actor (see ``arc.actor``).
    """

    Options: ClassVar[type[Any]] = NoOptions

    def __init__(self, runtime: Runtime, config: Config, options: Any = None) -> None:
        super().__init__(runtime, config)
        self.options: Any = options if options is not None else self.Options()
        self._served: list[int] = []

    def serve(self, port: int, app: ASGIApp) -> dict[str, Any]:
        """Serve ``app`` (ASGI 3) over plain HTTP on ``port`` through Esper.

        Esper binds the port on the addresses of ``[arcology] bind``. Returns
        Esper's answer to ``listen``. Raises ``ConfigError`` when the port
        already belongs to a service or another plugin, and the error Esper
        answers when it cannot open the port (in use by another process).
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise BadInput(f"{self.name}: serve: port must be 1-65535 (got {port!r})")
        dataplane = self.runtime.dataplane
        if port in self._served:
            # Serving again: the new application replaces the old one.
            dataplane.port_apps[port] = app
            return {"port": port, "tls": False, "already_open": True}
        if port in dataplane.port_apps:
            raise ConfigError(
                f"{self.name}: port {port} is already served by another plugin"
            )

        # Look before registering: HttpProtocol serves port_apps first, so an
        # app registered on a service's port would answer in its place.
        status = self.runtime.ask("Esper", "status", {}, timeout=LISTEN_TIMEOUT_S)
        for listening in status.get("listeners", []):
            if listening.get("port") == port:
                raise ConfigError(
                    f"{self.name}: port {port} is already a listener of Arcology "
                    f"(owner {listening.get('owner') or 'unknown'}); choose another "
                    "port"
                )
        dataplane.port_apps[port] = app
        try:
            answer = self.runtime.ask(
                "Esper",
                "listen",
                {"port": port, "tls": False, "owner": self.name},
                timeout=LISTEN_TIMEOUT_S,
            )
        except ArcError:
            dataplane.port_apps.pop(port, None)
            raise
        if isinstance(answer, dict) and answer.get("already_open"):
            # Opened by someone else since the look above: give it back.
            dataplane.port_apps.pop(port, None)
            raise ConfigError(
                f"{self.name}: port {port} is already a listener of Arcology "
                "(a service uses it); choose another port"
            )
        self._served.append(port)
        self.log.info("plugin listener opened name={n} port={p}", n=self.name, p=port)
        return dict(answer) if isinstance(answer, dict) else {"port": port}

    def stop_serving(self, port: int) -> None:
        """Close a listener opened with ``serve``."""
        if port not in self._served:
            return
        self._served.remove(port)
        self.runtime.dataplane.port_apps.pop(port, None)
        self.runtime.tell("Esper", "stopListener", {"port": port})
        self.log.info("plugin listener closed name={n} port={p}", n=self.name, p=port)

    def close_listeners(self) -> None:
        """Close every listener opened with ``serve``."""
        for port in list(self._served):
            self.stop_serving(port)

    def on_stop(self) -> None:
        """Close the plugin's listeners (done also when an override forgets)."""
        self.close_listeners()


# -- options ------------------------------------------------------------------


class _Mismatch(Exception):
    """A value is not of the declared type; carries what was expected."""

    def __init__(self, expected: str, got: Any = None, where: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.where = where


def _type_name(hint: Any) -> str:
    """How a declared type reads in an error message."""
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "nothing"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple) and args:
        return f"a list of {_type_name(args[0])}"
    if origin is dict and len(args) == 2:
        return f"a table of {_type_name(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "a table"
    if hint is Path:
        return "path (string)"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint)


def _got(value: Any) -> str:
    """What arrived, value and TOML-ish type, for an error message."""
    kind = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({kind})"


def _convert(value: Any, hint: Any, base_dir: Path) -> Any:
    """``value`` as ``hint``; raises ``_Mismatch`` when it is not one."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _Mismatch(_type_name(hint))
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, base_dir)
            except _Mismatch:
                continue
        raise _Mismatch(_type_name(hint))
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch(_type_name(hint))
        item = args[0] if args else Any
        if origin is tuple and len(args) != 2 and args:
            raise _Mismatch(_type_name(hint))
        items = []
        for index, element in enumerate(value):
            try:
                items.append(_convert(element, item, base_dir))
            except _Mismatch as exc:
                where = f"[{index}]{exc.where}"
                raise _Mismatch(exc.expected, exc.got or element, where) from None
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(_type_name(hint))
        item = args[1] if len(args) == 2 else Any
        out = {}
        for key, element in value.items():
            try:
                out[key] = _convert(element, item, base_dir)
            except _Mismatch as exc:
                where = f".{key}{exc.where}"
                raise _Mismatch(exc.expected, exc.got or element, where) from None
        return out
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise _Mismatch("a table")
        return _build(hint, value, base_dir)
    if hint is Path:
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            return path if path.is_absolute() else base_dir / path
        raise _Mismatch(_type_name(hint))
    # TOML has booleans apart from integers; Python's bool is an int.
    if isinstance(value, bool) and hint is not bool:
        raise _Mismatch(_type_name(hint))
    if hint is float and isinstance(value, int):
        return float(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch(_type_name(hint))


class _FieldError(Exception):
    """One field of an options table is refused."""

    def __init__(self, message: str, *, names_field: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.names_field = names_field


def _build(options_cls: type[Any], table: Mapping[str, Any], base_dir: Path) -> Any:
    """An instance of the dataclass ``options_cls`` from ``table``."""
    try:
        hints = typing.get_type_hints(options_cls)
    except Exception as exc:
        raise _FieldError(
            f"its Options declaration cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    fields = {f.name: f for f in dataclasses.fields(options_cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise _FieldError(f'unknown field "{unknown[0]}" (known fields: {known})')
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in table:
            no_default = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if no_default:
                expected = _type_name(hints.get(name, Any))
                raise _FieldError(f"{name} is required ({expected})", names_field=True)
            continue
        try:
            values[name] = _convert(table[name], hints.get(name, Any), base_dir)
        except _Mismatch as exc:
            got = table[name] if exc.got is None else exc.got
            raise _FieldError(
                f"{name}{exc.where} expects {exc.expected}, got {_got(got)}",
                names_field=True,
            ) from None
        except _FieldError as exc:
            # A sub-table's refusal: "sub.depth expects ..." or "sub: unknown ...".
            joint = "." if exc.names_field else ": "
            raise _FieldError(f"{name}{joint}{exc.message}", names_field=True) from None
    try:
        return options_cls(**values)
    except (ValueError, TypeError) as exc:
        raise _FieldError(str(exc)) from exc


def parse_options(
    plugin: str,
    options_cls: type[Any],
    table: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    label: str = "arcology.toml",
) -> Any:
    """Check a plugin's table against its ``Options`` dataclass.

    Args:
        plugin: the plugin's name, for messages.
        options_cls: a dataclass; its fields and their annotations are the
            declaration (str, int, float, bool, Path, Literal[...], X | None,
            list[X], tuple[X, ...], dict[str, X], a nested dataclass).
        table: the ``[plugins.NAME]`` table without ``actor``.
        base_dir: relative ``Path`` fields are taken from here.
        label: the configuration file's name, for messages.

    Raises:
        ConfigError: naming the file, the plugin, the field, what was expected
            and what arrived, e.g. ``arcology.toml: [plugins.metrics]: listen
            expects str, got 9464 (integer)``.
    """
    if not dataclasses.is_dataclass(options_cls) or not isinstance(options_cls, type):
        raise ConfigError(
            f"{label}: [plugins.{plugin}]: the plugin declares Options "
            f"{options_cls!r}, which is not a dataclass"
        )
    try:
        return _build(options_cls, table, base_dir or Path.cwd())
    except _FieldError as exc:
        raise ConfigError(f"{label}: [plugins.{plugin}]: {exc.message}") from None


# -- finding ------------------------------------------------------------------


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, []).append(point)
    return found


def _import_target(target: str, base_dir: Path) -> Any:
    """Import ``"module:Class"`` with ``base_dir`` on ``sys.path``."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f'actor must be "module:Class" (got {target!r})')
    # Appended, not prepended: a file in the configuration's folder must not
    # shadow the standard library or an installed package for the process.
    folder = str(base_dir)
    if folder not in sys.path:
        sys.path.append(folder)
    importlib.invalidate_caches()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"cannot import {module_name!r} from {folder} or the installed "
            f"packages ({type(exc).__name__}: {exc})"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(f"module {module_name!r} has no {attr!r}") from exc
    return obj


def find_plugin_class(name: str, table: Mapping[str, Any], config: Config) -> Any:
    """The object a ``[plugins.NAME]`` table names (not yet checked).

    Raises:
        ConfigError: when it cannot be found or imported, saying why.
    """
    target = table.get(ACTOR_KEY)
    if target is not None:
        if not isinstance(target, str):
            raise ConfigError(f'actor must be "module:Class" (got {target!r})')
        return _import_target(target, config.base_dir)
    points = _entry_points().get(name)
    if not points:
        installed = ", ".join(sorted(_entry_points())) or "none"
        raise ConfigError(
            f'no entry point "{name}" in group {ENTRY_POINT_GROUP} (installed: '
            f'{installed}) and no actor = "module:Class" in the table'
        )
    if len(points) > 1:
        log.warning(
            "several packages publish the plugin; using the first name={n} targets={t}",
            n=name,
            t=",".join(p.value for p in points),
        )
    try:
        return points[0].load()
    except Exception as exc:
        raise ConfigError(
            f"cannot import {points[0].value} ({type(exc).__name__}: {exc})"
        ) from exc


@dataclasses.dataclass
class _Prepared:
    """A plugin ready to start: its registered class and what it is given."""

    name: str
    cls: type[Actor]
    kwargs: dict[str, Any]
    start_error: list[str]
    required: bool = False


def _registered_class(
    name: str, cls: type[Actor], start_error: list[str]
) -> type[Actor]:
    """A subclass of ``cls`` registered as ``name``.

    It keeps the text of an exception raised by ``on_start`` (the runtime
    logs the traceback; ``start_plugins`` says why in its own line), and its
    ``on_stop`` always closes the plugin's listeners.
    """

    def on_start(self: Actor) -> None:
        try:
            cls.on_start(self)
        except Exception as exc:
            start_error[:] = [f"{type(exc).__name__}: {exc}"]
            raise

    def on_stop(self: Actor) -> None:
        # An override of on_stop that does not call the base must still not
        # leave a port answering for a plugin that is gone.
        try:
            cls.on_stop(self)
        finally:
            if isinstance(self, Plugin):
                self.close_listeners()

    namespace = {
        "name": name,
        "on_start": on_start,
        "on_stop": on_stop,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)


def prepare_plugin(name: str, table: Mapping[str, Any], config: Config) -> _Prepared:
    """Find, check and configure one plugin; raise ``ConfigError`` saying why not."""
    label = config.path.name if config.path is not None else "arcology.toml"
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{label}: [plugins.{name}]: a plugin name is letters, digits and _ "
            "starting with a letter"
        )
    try:
        found = find_plugin_class(name, table, config)
    except ConfigError as exc:
        raise ConfigError(f"{label}: [plugins.{name}]: {exc.message}") from exc
    if not (isinstance(found, type) and issubclass(found, Actor)):
        raise ConfigError(
            f"{label}: [plugins.{name}]: {found!r} is not an Actor subclass"
        )
    required = table.get(REQUIRED_KEY, False)
    if not isinstance(required, bool):
        raise ConfigError(
            f"{label}: [plugins.{name}]: {REQUIRED_KEY} must be true or false "
            f"(got {required!r})"
        )
    options_table = {
        k: v for k, v in table.items() if k not in (ACTOR_KEY, REQUIRED_KEY)
    }
    kwargs: dict[str, Any] = {}
    if issubclass(found, Plugin):
        kwargs["options"] = parse_options(
            name, found.Options, options_table, base_dir=config.base_dir, label=label
        )
    elif options_table:
        parse_options(name, NoOptions, options_table, label=label)
    start_error: list[str] = []
    registered = _registered_class(name, found, start_error)
    return _Prepared(name, registered, kwargs, start_error, required)


def start_plugins(runtime: Runtime, config: Config) -> list[str]:
    """Start every plugin the configuration enables; return those that started.

    Call it once the core actors run. A plugin that cannot start is logged
    at ERROR with the reason and left out; this never raises for one.
    """
    pending: list[_Prepared] = []
    for name, table in config.plugins.items():
        try:
            pending.append(prepare_plugin(name, table, config))
        except ArcError as exc:
            _left_out(name, exc.message)
        except Exception as exc:
            _left_out(name, f"{type(exc).__name__}: {exc}")

    # Start in rounds so a plugin that needs another comes after it; what is
    # still waiting when a round starts nothing needs an actor that is absent.
    started: list[str] = []
    while pending:
        running = set(runtime.names())
        ready = [p for p in pending if set(p.cls.needs) <= running]
        if not ready:
            for plugin in pending:
                missing = sorted(set(plugin.cls.needs) - running)
                _left_out(
                    plugin.name, f"needs {', '.join(missing)}, which is not running"
                )
            break
        for plugin in ready:
            pending.remove(plugin)
            if _start_one(runtime, plugin):
                started.append(plugin.name)
    if started:
        log.info("plugins started names={n}", n=",".join(started))
    return started


def _start_one(runtime: Runtime, plugin: _Prepared) -> bool:
    if plugin.name in runtime.names():
        _left_out(plugin.name, f"an actor named {plugin.name} is already running")
        return False
    try:
        runtime.add(plugin.cls, plugin.kwargs, essential=plugin.required)
    except Exception as exc:
        # ``add`` forgets an actor whose on_start raised, but keeps the name
        # registered when the constructor itself raised: forget it here.
        runtime.remove(plugin.name)
        reason = plugin.start_error[0] if plugin.start_error else _reason(exc)
        _left_out(plugin.name, f"raised while starting ({reason})")
        return False
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ArcError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _left_out(name: str, reason: str) -> None:
    log.error("plugin left out name={n} reason={r}", n=name, r=reason)
