"""Configuration: one TOML file, checked whole before anything starts.

The file has an ``[arcology]`` table of settings, ``[[services]]`` entries and
``[plugins.NAME]`` tables. Every refusal is a ``ConfigError`` whose message
names the file, the entry and the field, and says what was expected and what
arrived::

    arcology.toml: services[2] "shop": tls must be one of none, optional,
    required (got "yes")

Relative paths are taken from the file's folder. With no file, Arcology runs
on the embedded defaults: data in ``./arc-data``, the admin channel on
127.0.0.1:7399 and a welcome service for ``localhost`` on ports 8080 (HTTP)
and 8443 (HTTPS, with a certificate from a local development authority).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from arc.errors import BadInput, ConfigError
from arc.names import is_wildcard, normalise_domain

DEFAULT_CONFIG_FILE = "arcology.toml"
DEFAULT_DATA_DIR = "arc-data"
WELCOME_ROOT = Path(__file__).parent / "welcome"
TLS_MODES = ("none", "optional", "required")
TlsMode = Literal["none", "optional", "required"]

_HOST_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]+$")


@dataclass(frozen=True)
class Settings:
    """The ``[arcology]`` table."""

    data_dir: Path
    admin: tuple[str, int] = ("127.0.0.1", 7399)
    admin_tls_cert: Path | None = None
    token_file: Path = Path()
    store: str = "sqlite"
    master_key_file: Path = Path()
    tls_fallback: str = "reject"
    bind: tuple[str, ...] = ("127.0.0.1", "::1")
    cache_size: int = 10_000
    cache_ttl_s: float = 86_400.0
    negative_ttl_s: float = 5.0
    handshake_timeout_s: float = 10.0
    expiry_warning_days: int = 30
    hsts: str = "max-age=31536000"
    access_log: bool = True
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    shutdown_grace_s: float = 10.0
    local_ca: bool = False


# The settings a reload puts in force at once; any other needs a restart
# (they decide what the process opened at start: ports, the store, files).
LIVE_SETTINGS = frozenset(
    {
        "tls_fallback",
        "handshake_timeout_s",
        "cache_size",
        "cache_ttl_s",
        "negative_ttl_s",
        "expiry_warning_days",
        "hsts",
        "access_log",
        "max_body_bytes",
        "header_timeout_s",
        "body_timeout_s",
        "shutdown_grace_s",
    }
)


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """The names of the ``[arcology]`` settings that differ, in field order."""
    return [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[[services]]`` entry."""

    name: str
    hosts: tuple[str, ...]
    port: int | None = None
    tls: TlsMode = "none"
    tls_port: int = 443
    root: Path | None = None
    app: str | None = None
    index: int = 0


@dataclass(frozen=True)
class Config:
    """A whole configuration, validated."""

    arcology: Settings
    services: tuple[ServiceConfig, ...] = ()
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)

    @classmethod
    def embedded(cls, data_dir: Path | None = None) -> Config:
        """The embedded defaults, used when there is no configuration file."""
        base = Path.cwd()
        data = (data_dir or base / DEFAULT_DATA_DIR).absolute()
        welcome = ServiceConfig(
            name="welcome",
            hosts=("localhost",),
            port=8080,
            tls="optional",
            tls_port=8443,
            root=WELCOME_ROOT,
        )
        return cls(
            arcology=_with_data_paths(Settings(data_dir=data, local_ca=True), {}),
            services=(welcome,),
            path=None,
            base_dir=base,
        )

    @classmethod
    def from_toml_text(
        cls, text: str, path: Path | None = None, base_dir: Path | None = None
    ) -> Config:
        """Parse and validate the text of a configuration file."""
        label = path.name if path is not None else DEFAULT_CONFIG_FILE
        base = (base_dir or (path.parent if path else Path.cwd())).absolute()
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{label}: not valid TOML ({exc})") from exc
        return _Parser(label, base).config(raw, path)

    def with_settings(self, **changes: Any) -> Config:
        """A copy with some ``[arcology]`` settings changed."""
        return replace(self, arcology=replace(self.arcology, **changes))


def load_config(path: Path | str | None = None) -> Config:
    """Read the configuration file, or the embedded defaults without one.

    ``path`` None means ``./arcology.toml`` if it exists, else the defaults.
    A path that was named but does not exist is an error.
    """
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.exists():
            return Config.embedded()
        path = default
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    return Config.from_toml_text(text, path.absolute())


def _with_data_paths(settings: Settings, raw: dict[str, Any]) -> Settings:
    data = settings.data_dir
    return replace(
        settings,
        token_file=raw.get("token_file") or data / "admin.token",
        master_key_file=raw.get("master_key_file") or data / "master.key",
    )


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` to a pair; ValueError names ``what``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f'{what} must be "HOST:PORT" (got "{text}")')
    host = host.strip("[]")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{what} port must be 1-65535 (got {port})")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Parser:
    """Turns the raw TOML tree into a ``Config`` or a precise ``ConfigError``."""

    # Every field of Settings is a key of the [arcology] table.
    SETTINGS_FIELDS = frozenset(f.name for f in fields(Settings))
    SERVICE_FIELDS = {"name", "hosts", "port", "tls", "tlsPort", "root", "app"}

    def __init__(self, label: str, base: Path) -> None:
        self.label = label
        self.base = base

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.label}: {where}: {message}")

    def config(self, raw: dict[str, Any], path: Path | None) -> Config:
        unknown = set(raw) - {"arcology", "services", "plugins"}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(
                f'{self.label}: unknown table "{name}" (expected arcology, '
                "services, plugins)"
            )
        settings = self.settings(self.table(raw, "arcology"))
        services = self.services(raw.get("services", []))
        plugins = self.table(raw, "plugins")
        for name, table in plugins.items():
            if not isinstance(table, dict):
                raise self.fail(f"plugins.{name}", "must be a table")
        return Config(
            arcology=settings,
            services=services,
            plugins={name: dict(table) for name, table in plugins.items()},
            path=path,
            base_dir=self.base,
        )

    def table(self, raw: dict[str, Any], name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.label}: [{name}] must be a table")
        return value

    def path(self, value: Any, where: str, name: str) -> Path:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"{name} must be a path (got {value!r})")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def number(
        self, value: Any, where: str, name: str, *, integer: bool, low: float
    ) -> Any:
        kinds: tuple[type[int] | type[float], ...] = (int,) if integer else (int, float)
        ok = not isinstance(value, bool) and isinstance(value, kinds)
        if not ok or value < low:
            kind = "an integer" if integer else "a number"
            raise self.fail(where, f"{name} must be {kind} >= {low:g} (got {value!r})")
        return value

    def settings(self, raw: dict[str, Any]) -> Settings:
        where = "[arcology]"
        unknown = set(raw) - self.SETTINGS_FIELDS
        if unknown:
            raise self.fail(where, f'unknown field "{sorted(unknown)[0]}"')
        values: dict[str, Any] = {}
        data_dir = self.path(raw.get("data_dir", DEFAULT_DATA_DIR), where, "data_dir")
        values["data_dir"] = data_dir
        if "admin" in raw:
            try:
                values["admin"] = parse_address(str(raw["admin"]), "admin")
            except ValueError as exc:
                raise self.fail(where, str(exc)) from exc
        for name in ("admin_tls_cert", "token_file", "master_key_file"):
            if name in raw:
                values[name] = self.path(raw[name], where, name)
        if "store" in raw:
            store = raw["store"]
            if not isinstance(store, str) or not (
                store == "sqlite" or store.startswith(("postgresql://", "postgres://"))
            ):
                raise self.fail(
                    where,
                    'store must be "sqlite" or a "postgresql://..." URL '
                    f"(got {store!r})",
                )
            values["store"] = store
        if "tls_fallback" in raw:
            values["tls_fallback"] = self.fallback(raw["tls_fallback"], where)
        if "bind" in raw:
            values["bind"] = self.bind(raw["bind"], where)
        for name, integer, low in (
            ("cache_size", True, 1),
            ("cache_ttl_s", False, 0),
            ("negative_ttl_s", False, 0),
            ("handshake_timeout_s", False, 0.1),
            ("expiry_warning_days", True, 0),
            ("max_body_bytes", True, 0),
            ("header_timeout_s", False, 0.1),
            ("body_timeout_s", False, 0.1),
            ("shutdown_grace_s", False, 0),
        ):
            if name in raw:
                values[name] = self.number(
                    raw[name], where, name, integer=integer, low=low
                )
        for name in ("access_log", "local_ca"):
            if name in raw:
                if not isinstance(raw[name], bool):
                    raise self.fail(
                        where, f"{name} must be true or false (got {raw[name]!r})"
                    )
                values[name] = raw[name]
        if "hsts" in raw:
            if not isinstance(raw["hsts"], str):
                raise self.fail(where, f"hsts must be a string (got {raw['hsts']!r})")
            values["hsts"] = raw["hsts"]
        settings = _with_data_paths(Settings(**values), values)
        host = settings.admin[0]
        if not is_loopback(host) and settings.admin_tls_cert is None:
            raise self.fail(
                where,
                f"admin listens on {host}, which is not loopback: name a certificate "
                "bundle for it in admin_tls_cert",
            )
        return settings

    def fallback(self, value: Any, where: str) -> str:
        # The fallback's certificate answers handshakes whose name is unknown
        # or absent, so it must be one plain domain Cryptosaur can look up: a
        # wildcard names no single certificate a client could be sent.
        expected = 'tls_fallback must be "reject" or a domain'
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"{expected} (got {value!r})")
        if value.lower() == "reject":
            return "reject"
        try:
            domain = normalise_domain(value)
        except BadInput as exc:
            reason = exc.message.removeprefix(f"domain {value!r}: ")
            raise self.fail(where, f"{expected} (got {value!r}: {reason})") from exc
        if is_wildcard(domain):
            raise self.fail(
                where,
                f"{expected}, not a wildcard (got {value!r}): name one domain "
                "the certificate covers",
            )
        return domain

    def bind(self, value: Any, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"bind must be a list of addresses (got {value!r})")
        for address in value:
            try:
                ipaddress.ip_address(address)
            except (ValueError, TypeError) as exc:
                raise self.fail(
                    where, f"bind must hold IP addresses (got {address!r})"
                ) from exc
        return tuple(value)

    def services(self, raw: Any) -> tuple[ServiceConfig, ...]:
        if not isinstance(raw, list):
            raise ConfigError(f"{self.label}: services must be [[services]] entries")
        services = [self.service(index, entry) for index, entry in enumerate(raw)]
        names: dict[str, int] = {}
        for service in services:
            if service.name in names:
                raise self.fail(
                    f'services[{service.index}] "{service.name}"',
                    f"name is already used by services[{names[service.name]}]",
                )
            names[service.name] = service.index
        self.check_ports(services)
        return tuple(services)

    def check_ports(self, services: list[ServiceConfig]) -> None:
        # Each port is one listener, plain or TLS: a port asked for as both
        # cannot be served, so name both services that want it.
        wanted: dict[int, tuple[bool, ServiceConfig]] = {}
        for service in services:
            ports = [(service.port, False)] if service.port is not None else []
            if service.tls != "none":
                ports.append((service.tls_port, True))
            for port, tls in ports:
                first = wanted.setdefault(port, (tls, service))
                if first[0] != tls:
                    plain, secure = (
                        (service, first[1])
                        if tls is False
                        else (
                            first[1],
                            service,
                        )
                    )
                    raise ConfigError(
                        f"{self.label}: port {port} is wanted as plain HTTP by "
                        f'services[{plain.index}] "{plain.name}" and as TLS by '
                        f'services[{secure.index}] "{secure.name}"; a port is '
                        "either plain or TLS"
                    )

    def service(self, index: int, raw: Any) -> ServiceConfig:
        where = f"services[{index}]"
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(where, f"name must be a non-empty string (got {name!r})")
        where = f'services[{index}] "{name}"'
        unknown = set(raw) - self.SERVICE_FIELDS
        if unknown:
            raise self.fail(where, f'unknown field "{sorted(unknown)[0]}"')

        hosts = raw.get("hosts")
        if isinstance(hosts, str):
            hosts = [hosts]
        if not isinstance(hosts, list) or not hosts:
            raise self.fail(where, f"hosts must be a list of names (got {hosts!r})")
        normal: list[str] = []
        for host in hosts:
            text = host.lower().rstrip(".") if isinstance(host, str) else ""
            try:
                text = text.encode("idna").decode("ascii") if "*" not in text else text
            except UnicodeError:
                text = ""
            if not _HOST_RE.match(text):
                raise self.fail(
                    where,
                    f"hosts holds {host!r}, which is not a host name or *.wildcard",
                )
            normal.append(text)

        tls = raw.get("tls", "none")
        if tls not in TLS_MODES:
            raise self.fail(
                where, f'tls must be one of none, optional, required (got "{tls}")'
            )
        port = raw.get("port")
        if port is not None:
            port = self.port(port, where, "port")
        tls_port = self.port(raw.get("tlsPort", 443), where, "tlsPort")
        if port is None and tls == "none":
            raise self.fail(where, 'needs a port (plain HTTP) when tls is "none"')
        if port is not None and tls != "none" and port == tls_port:
            raise self.fail(where, f"port and tlsPort are both {port}")

        root = raw.get("root")
        app = raw.get("app")
        if (root is None) == (app is None):
            raise self.fail(
                where, 'needs exactly one of root (a folder) or app ("module:attr")'
            )
        root_path = None
        if root is not None:
            root_path = self.path(root, where, "root")
            if not root_path.is_dir():
                raise self.fail(where, f"root {str(root_path)!r} is not a folder")
        if app is not None and (
            not isinstance(app, str) or app.count(":") != 1 or app.startswith(":")
        ):
            raise self.fail(where, f'app must be "module:attr" (got {app!r})')
        return ServiceConfig(
            name=name,
            hosts=tuple(normal),
            port=port,
            tls=tls,
            tls_port=tls_port,
            root=root_path,
            app=app,
            index=index,
        )

    def port(self, value: Any, where: str, name: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 < value < 65536
        ):
            raise self.fail(
                where, f"{name} must be a port number 1-65535 (got {value!r})"
            )
        return value
