"""What the plugin tests share: the guide's files, its package, configs, waiting."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from arc.config import Config

# One metric's samples: value by sorted (label, value) pairs.
Samples = dict[tuple[tuple[str, str], ...], float]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def docs_files() -> dict[str, str]:
    """The files the plugin guide shows, by name (fences marked ``file=``)."""
    text = DOCS.read_text(encoding="utf-8")
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"```\w+ file=(\S+)\n(.*?)```", text, re.S)
    }


def install_guide_plugin(source: Path, target: Path) -> None:
    """Write the guide's example package into ``source``, pip-install it in ``target``.

    ``target`` is a plain folder (``pip install --target``): put it on
    ``sys.path`` or ``PYTHONPATH`` to import ``arcology_hello``.
    """
    files = docs_files()
    for name in ("pyproject.toml", "arcology_hello.py"):
        (source / name).write_text(files[name])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def config_in(folder: Path, tables: str) -> Config:
    """A configuration file in ``folder``: data in ``data``, then ``tables``.

    ``tables`` is dedented and follows the ``[arcology]`` table after a blank
    line, so it may open with more ``[arcology]`` keys.
    """
    path = folder / "arcology.toml"
    path.write_text(f'[arcology]\ndata_dir = "data"\n\n{textwrap.dedent(tables)}')
    return Config.from_toml_text(path.read_text(), path)


def wait_for(
    check: Callable[[], bool], timeout: float = 5.0, interval_s: float = 0.02
) -> bool:
    """Poll ``check`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


def metric_samples(text: str) -> dict[str, Samples]:
    """Every sample of a Prometheus exposition, by sample name then labels.

    The text is read by the Prometheus client library, not by Arcology.
    """
    found: dict[str, Samples] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found
