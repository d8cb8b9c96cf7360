"""Plugins: found by entry point or module, configured, started, left out."""

from __future__ import annotations

import contextlib
import importlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from actors.cryptosaur import Cryptosaur
from actors.esper import Esper
from arc import runtime as runtime_module
from arc.actor import Actor, verb
from arc.config import Config
from arc.errors import ArcError, ConfigError, Internal, NotFound
from arc.plugins import Plugin, parse_options, prepare_plugin, start_plugins
from arc.runtime import Runtime
from arc.testing import running
from tests.certs import make_chain
from tests.e2e.server import free_port
from tests.plugin_helpers import config_in, docs_files, install_guide_plugin, wait_for

ORDER: list[str] = []


@pytest.fixture(scope="module")
def hello_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The guide's example, packaged and installed with pip into a target dir."""
    source = tmp_path_factory.mktemp("arcology-hello")
    target = tmp_path_factory.mktemp("site")
    install_guide_plugin(source, target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("arcology_hello", None)
    shutil.rmtree(target, ignore_errors=True)


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)
    importlib.invalidate_caches()


# -- found, configured, started -----------------------------------------------


def test_a_packaged_plugin_is_found_by_its_entry_point_and_answers_a_request(
    hello_package: Path, tmp_path: Path
) -> None:
    config = config_in(tmp_path, '[plugins.hello]\ngreeting = "hi"\nshout = true\n')

    with running([Cryptosaur], config) as rt:
        started = start_plugins(rt, config)
        answer = rt.request("hello.greet", {"name": "Ada"})

    assert started == ["hello"]
    assert answer == {"text": "HI, ADA", "certificates": 0, "changed": []}


def test_a_plugin_hears_an_upload_and_asks_cryptosaur_for_the_list(
    hello_package: Path, tmp_path: Path
) -> None:
    config = config_in(tmp_path, "[plugins.hello]\n")
    chain = make_chain("shop.example.com", "www.shop.example.com")

    with running([Cryptosaur], config) as rt:
        start_plugins(rt, config)
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        heard = wait_for(lambda: rt.request("hello.greet", {})["changed"] != [])
        answer = rt.request("hello.greet", {})

    assert heard
    assert sorted(answer["changed"]) == ["shop.example.com", "www.shop.example.com"]
    # listCertificates gives one summary per stored domain.
    assert answer["certificates"] == 2


def test_a_plugin_serves_its_own_page_through_esper(
    hello_package: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = config_in(tmp_path, f'[plugins.hello]\ngreeting = "hey"\nport = {port}\n')

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=5) as page:
            body = page.read()
        owners = {
            item["port"]: item["owner"]
            for item in rt.ask("Esper", "status")["listeners"]
        }

    assert body == b"hey from /x\n"
    assert owners == {port: "hello"}


def test_the_guide_s_own_test_passes_as_written(tmp_path: Path) -> None:
    files = docs_files()
    for name in ("arcology_hello.py", "test_hello.py"):
        (tmp_path / name).write_text(files[name])

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


class Renamed(Plugin):
    name = "SomethingElse"

    @verb("whoami")
    def whoami(self, payload: Any) -> Any:
        return self.name


def test_a_plugin_named_by_module_and_class_is_imported_from_the_config_folder(
    tmp_path: Path,
) -> None:
    write_module(
        tmp_path,
        "local_plugin_mod",
        """
        from arc.actor import verb
        from arc.plugins import Plugin

        class Local(Plugin):
            name = "local"

            @verb("ping")
            def ping(self, payload):
                return {"pong": payload, "from": __name__}
        """,
    )
    config = config_in(tmp_path, '[plugins.mine]\nactor = "local_plugin_mod:Local"\n')

    with running([Cryptosaur], config) as rt:
        started = start_plugins(rt, config)
        answer = rt.request("mine.ping", 7)

    assert started == ["mine"]
    assert answer == {"pong": 7, "from": "local_plugin_mod"}


def test_a_plugin_is_registered_under_its_table_name_whatever_its_class_says(
    tmp_path: Path,
) -> None:
    config = config_in(
        tmp_path, '[plugins.renamed]\nactor = "tests.arc.test_plugins:Renamed"\n'
    )

    with running([Cryptosaur], config) as rt:
        start_plugins(rt, config)
        answer = rt.request("renamed.whoami")
        names = rt.names()

    assert answer == "renamed"
    assert names == ["Cryptosaur", "renamed"]
    assert Renamed.name == "SomethingElse"


class Listens(Plugin):
    hears = ("Esper.listenerOpened", "Esper.listenerClosed")

    def on_start(self) -> None:
        self.heard: list[Any] = []

    @verb("Esper.listenerOpened")
    def opened(self, payload: Any) -> None:
        self.heard.append(["opened", payload])

    @verb("Esper.listenerClosed")
    def closed(self, payload: Any) -> None:
        self.heard.append(["closed", payload])

    @verb("heard")
    def report(self, payload: Any) -> Any:
        return self.heard


def test_a_plugin_hears_esper_open_and_close_listeners(tmp_path: Path) -> None:
    port = free_port()
    config = config_in(
        tmp_path, '[plugins.ears]\nactor = "tests.arc.test_plugins:Listens"\n'
    )

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        rt.ask("Esper", "listen", {"port": port, "tls": False})
        rt.ask("Esper", "stopListener", {"port": port})
        both = wait_for(lambda: len(rt.request("ears.heard")) == 2)
        heard = rt.request("ears.heard")

    assert both
    assert heard == [
        ["opened", {"port": port, "tls": False}],
        ["closed", {"port": port, "tls": False}],
    ]


class AskOnStop(Plugin):
    needs = ("Cryptosaur",)

    def on_start(self) -> None:
        ORDER.append(f"start {self.name}")

    def on_stop(self) -> None:
        listed = self.runtime.ask("Cryptosaur", "listCertificates", {}, timeout=2)
        ORDER.append(f"stop {self.name} saw {len(listed)}")
        super().on_stop()


class NeedsFirst(Plugin):
    needs = ("Cryptosaur", "first")

    def on_start(self) -> None:
        ORDER.append(f"start {self.name}")


def test_plugins_start_after_what_they_need_and_stop_before_the_core(
    tmp_path: Path,
) -> None:
    ORDER.clear()
    config = config_in(
        tmp_path,
        """
        [plugins.second]
        actor = "tests.arc.test_plugins:NeedsFirst"
        [plugins.first]
        actor = "tests.arc.test_plugins:AskOnStop"
        """,
    )

    with running([Cryptosaur], config) as rt:
        started = start_plugins(rt, config)

    assert started == ["first", "second"]
    # Cryptosaur still answered while the plugin stopped.
    assert ORDER == ["start first", "start second", "stop first saw 0"]


class CrashesOnAsk(Plugin):
    @dataclass(frozen=True)
    class Options:
        label: str = "x"

    @verb("crash")
    def crash(self, payload: Any) -> Any:
        raise RuntimeError("plugin bug on purpose")

    @verb("label")
    def label(self, payload: Any) -> Any:
        return self.options.label


def test_a_plugin_that_crashes_later_is_restarted_with_the_same_options(
    tmp_path: Path,
) -> None:
    config = config_in(
        tmp_path,
        '[plugins.fragile]\nactor = "tests.arc.test_plugins:CrashesOnAsk"\n'
        'label = "kept"\n',
    )

    with running([Cryptosaur], config) as rt:
        start_plugins(rt, config)
        with pytest.raises(Internal, match="plugin bug on purpose"):
            rt.request("fragile.crash")
        back = wait_for(lambda: _answers(rt, "fragile.label") == "kept")
        restarts = {a["name"]: a["restarts"] for a in rt.status()["actors"]}

    assert back
    assert restarts == {"Cryptosaur": 0, "fragile": 1}


@pytest.mark.parametrize(
    ("required", "stops"), [("", False), ("required = true\n", True)]
)
def test_a_plugin_in_a_crash_storm_is_given_up_unless_it_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: str, stops: bool
) -> None:
    monkeypatch.setattr(runtime_module, "MAX_RESTARTS", 2)
    monkeypatch.setattr(runtime_module, "FIRST_BACKOFF_S", 0.01)
    config = config_in(
        tmp_path,
        '[plugins.fragile]\nactor = "tests.arc.test_plugins:CrashesOnAsk"\n'
        'label = "kept"\n' + required,
    )

    with running([Cryptosaur], config) as rt:
        start_plugins(rt, config)

        def done() -> bool:
            with contextlib.suppress(ArcError):
                rt.request("fragile.crash", timeout=1)
            if stops:
                return rt.stopping.is_set()
            states: dict[str, str] = {
                a["name"]: a["state"] for a in rt.status()["actors"]
            }
            return states["fragile"] == "failed"

        assert wait_for(done, 10)
        time.sleep(0.1)  # a given-up plugin must not stop the process later
        stopping = rt.stopping.is_set()
        core = rt.ask("Cryptosaur", "listCertificates", {}) if not stopping else []

    assert stopping is stops
    assert core == []


class ServesThenCrashes(Plugin):
    @dataclass(frozen=True)
    class Options:
        port: int

    def on_start(self) -> None:
        self.serve(self.options.port, self.page)

    async def page(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"up"})

    @verb("crash")
    def crash(self, payload: Any) -> Any:
        raise RuntimeError("plugin bug on purpose")


def test_a_plugin_that_crashes_serves_its_port_again_once_restarted(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = config_in(
        tmp_path,
        '[plugins.pager]\nactor = "tests.arc.test_plugins:ServesThenCrashes"\n'
        f"port = {port}\n",
    )

    def page() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                return bytes(r.read())
        except OSError:
            return None

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        before = page()
        with pytest.raises(Internal):
            rt.request("pager.crash")
        back = wait_for(lambda: _restarts(rt)["pager"] == 1 and page() == b"up")

    assert before == b"up"
    assert back


class ForgetsTheBase(ServesThenCrashes):
    def on_stop(self) -> None:
        ORDER.append("custom stop ran")


def test_a_plugin_port_closes_even_when_on_stop_forgets_the_base(
    tmp_path: Path,
) -> None:
    ORDER.clear()
    port = free_port()
    config = config_in(
        tmp_path,
        '[plugins.careless]\nactor = "tests.arc.test_plugins:ForgetsTheBase"\n'
        f"port = {port}\n",
    )

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        rt.remove("careless")
        apps = dict(rt.dataplane.port_apps)
        listeners = rt.ask("Esper", "status")["listeners"]

    assert ORDER == ["custom stop ran"]
    assert apps == {}
    assert listeners == []


def _restarts(rt: Runtime) -> dict[str, int]:
    return {a["name"]: a["restarts"] for a in rt.status()["actors"]}


def _answers(rt: Runtime, full_verb: str) -> Any:
    try:
        return rt.request(full_verb, None, timeout=1)
    except Exception:
        return None


# -- left out, Arcology keeps serving -----------------------------------------


class RaisesOnStart(Plugin):
    def on_start(self) -> None:
        raise RuntimeError("the disk is on fire")


class RaisesInInit(Plugin):
    def __init__(self, runtime: Runtime, config: Config, options: Any = None) -> None:
        super().__init__(runtime, config, options)
        raise ValueError("cannot build")


class Healthy(Plugin):
    @verb("ping")
    def ping(self, payload: Any) -> Any:
        return "pong"


class NotAnActor:
    pass


def test_plugins_that_cannot_start_are_reported_and_the_rest_keeps_serving(
    tmp_path: Path, errors: list[str]
) -> None:
    here = "tests.arc.test_plugins"
    config = config_in(
        tmp_path,
        f"""
        [plugins.missing]
        actor = "no_such_module_anywhere:Thing"
        [plugins.broken]
        actor = "broken_mod:Thing"
        [plugins.badconfig]
        actor = "{here}:CrashesOnAsk"
        label = 5
        [plugins.onfire]
        actor = "{here}:RaisesOnStart"
        [plugins.noinit]
        actor = "{here}:RaisesInInit"
        [plugins.notactor]
        actor = "{here}:NotAnActor"
        [plugins.lonely]
        actor = "{here}:NeedsFirst"
        [plugins.nowhere]
        [plugins.healthy]
        actor = "{here}:Healthy"
        """,
    )
    write_module(tmp_path, "broken_mod", "raise ImportError('half written')\n")

    with running([Cryptosaur], config) as rt:
        started = start_plugins(rt, config)
        ping = rt.request("healthy.ping")
        listed = rt.ask("Cryptosaur", "listCertificates", {})
        names = rt.names()
        with pytest.raises(NotFound):
            rt.request("onfire.anything")

    assert started == ["healthy"]
    assert names == ["Cryptosaur", "healthy"]
    assert ping == "pong"
    assert listed == []
    left_out = "\n".join(line for line in errors if "plugin left out" in line)
    for name, reason in (
        ("missing", "cannot import 'no_such_module_anywhere'"),
        ("broken", "ImportError: half written"),
        ("badconfig", "label expects str, got 5 (integer)"),
        ("onfire", "raised while starting (RuntimeError: the disk is on fire)"),
        ("noinit", "raised while starting (ValueError: cannot build)"),
        ("notactor", "is not an Actor subclass"),
        ("lonely", "needs first, which is not running"),
        ("nowhere", 'no entry point "nowhere" in group arcology.actors'),
    ):
        assert re.search(rf"name={name} reason=.*{re.escape(reason)}", left_out), (
            f"{name}: {left_out}"
        )


def test_a_plugin_named_like_a_core_actor_is_left_out_and_the_core_is_untouched(
    tmp_path: Path, errors: list[str]
) -> None:
    config = config_in(
        tmp_path, '[plugins.Cryptosaur]\nactor = "tests.arc.test_plugins:Healthy"\n'
    )

    with running([Cryptosaur], config) as rt:
        started = start_plugins(rt, config)
        listed = rt.ask("Cryptosaur", "listCertificates", {})

    assert started == []
    assert listed == []
    assert any("name=Cryptosaur reason=an actor named" in e for e in errors)


# -- options ------------------------------------------------------------------


@dataclass(frozen=True)
class Sub:
    depth: int = 1


@dataclass(frozen=True)
class Options:
    name: str
    ratio: float = 0.5
    enabled: bool = True
    mode: Literal["fast", "safe"] = "safe"
    ports: list[int] = field(default_factory=list)
    hosts: tuple[str, ...] = ()
    folder: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    sub: Sub = Sub()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")


def options(table: dict[str, Any], base: Path = Path("/etc/arc")) -> Any:
    return parse_options("demo", Options, table, base_dir=base)


def test_options_take_their_defaults_and_convert_what_toml_gives() -> None:
    parsed = options(
        {
            "name": "a",
            "ratio": 2,
            "ports": [1, 2],
            "hosts": ["x", "y"],
            "folder": "sub/dir",
            "labels": {"k": "v"},
            "sub": {"depth": 3},
        }
    )

    assert parsed == Options(
        name="a",
        ratio=2.0,
        ports=[1, 2],
        hosts=("x", "y"),
        folder=Path("/etc/arc/sub/dir"),
        labels={"k": "v"},
        sub=Sub(depth=3),
    )
    assert isinstance(parsed.ratio, float)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"name": "a", "colour": "red"},
            'unknown field "colour" (known fields: enabled, folder, hosts,',
        ),
        ({}, "name is required (str)"),
        ({"name": 3}, "name expects str, got 3 (integer)"),
        ({"name": "a", "enabled": 1}, "enabled expects bool, got 1 (integer)"),
        ({"name": "a", "ratio": True}, "ratio expects float, got True (boolean)"),
        ({"name": "a", "mode": "slow"}, "mode expects one of 'fast', 'safe'"),
        ({"name": "a", "ports": [1, "2"]}, "ports[1] expects int, got '2' (string)"),
        ({"name": "a", "ports": 8}, "ports expects a list of int, got 8 (integer)"),
        ({"name": "a", "labels": {"k": 1}}, "labels.k expects str, got 1"),
        ({"name": "a", "sub": {"depth": "x"}}, "sub.depth expects int, got 'x'"),
        (
            {"name": "a", "sub": {"deep": 1}},
            'sub: unknown field "deep" (known fields: depth)',
        ),
        ({"name": "a", "folder": 1}, "folder expects path (string), got 1"),
        ({"name": ""}, "name must not be empty"),
    ],
)
def test_a_refused_option_names_plugin_field_expectation_and_what_came(
    table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        options(table)

    assert caught.value.message.startswith("arcology.toml: [plugins.demo]: ")
    assert message in caught.value.message


def test_required_must_be_a_boolean(tmp_path: Path) -> None:
    config = config_in(
        tmp_path,
        '[plugins.fragile]\nactor = "tests.arc.test_plugins:CrashesOnAsk"\n'
        'required = "yes"\n',
    )

    with pytest.raises(ConfigError, match="required must be true or false"):
        prepare_plugin("fragile", config.plugins["fragile"], config)


def test_a_plain_actor_plugin_takes_no_options(
    tmp_path: Path, errors: list[str]
) -> None:
    config = config_in(
        tmp_path,
        '[plugins.plain]\nactor = "tests.arc.test_plugins:PlainActor"\nx = 1\n'
        '[plugins.plain2]\nactor = "tests.arc.test_plugins:PlainActor"\n',
    )

    with running([Cryptosaur], config) as rt:
        started = start_plugins(rt, config)
        answer = rt.request("plain2.hi")

    assert started == ["plain2"]
    assert answer == "hi from plain2"
    assert any('unknown field "x" (known fields: none)' in e for e in errors)


class PlainActor(Actor):
    name = "plain"

    @verb("hi")
    def hi(self, payload: Any) -> Any:
        return f"hi from {self.name}"
