"""Point OpenSSL at Arcology's configuration file before it starts.

How this works: Python 3.11 has no call to choose the key-exchange groups of
an ``ssl.SSLContext``, and OpenSSL by default also offers X448 and P-521,
which Mozilla's intermediate profile excludes. OpenSSL reads the file named
by the ``OPENSSL_CONF`` environment variable once, the first time libcrypto
initialises itself in the process (the first ``hashlib`` digest or
``ssl.SSLContext``); after that the variable is ignored. ``arc/openssl.cnf``
holds a ``system_default`` section with ``Groups = X25519:P-256:P-384``.

:func:`ensure_openssl_conf` is the first thing the ``arcology`` command
calls, before importing anything else of Arcology:

- when ``OPENSSL_CONF`` already names the file, nothing happens;
- when libcrypto is not yet loaded in the process, it sets the variable and
  returns: OpenSSL will read it on first use;
- otherwise (something initialised OpenSSL already) it re-executes the same
  command line with the variable set, so the new process reads it from the
  start. ``os.execve`` keeps the process id. It does so only when the process
  is the ``arcology`` command itself (``sys.argv[0]`` ends in ``arcology`` or
  the process runs ``-m arc.cli``): called from a host program (a test
  calling ``arc.cli.main``), it leaves the process alone and answers False.

What always holds: after it returns, every context the process builds offers
only X25519, P-256 and P-384 (tests/arc/tls/test_context.py checks this with
a handshake from a client offering only P-521). Child processes inherit the
variable.

LIMITATION: the file replaces the system's openssl.cnf for this process
(its provider and policy sections do not apply); an operator who needs both
must merge them into one file and point ``OPENSSL_CONF`` at it, which this
function then leaves untouched only if it is this very file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENSSL_CONF_PATH = Path(__file__).resolve().parents[1] / "openssl.cnf"
# The only groups the configuration allows (Mozilla intermediate, v5.7).
ALLOWED_GROUPS = ("X25519", "P-256", "P-384")
# Guards against a re-exec loop if the environment is not carried over.
_REEXEC_MARK = "ARCOLOGY_OPENSSL_REEXEC"
# What the process was started with; only this module changes it afterwards.
_INHERITED_CONF = os.environ.get("OPENSSL_CONF")


def _libcrypto_loaded() -> bool:
    """Whether the process has already mapped the system libcrypto."""
    if "_ssl" in sys.modules or "_hashlib" in sys.modules:
        return True
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return True
    return "libcrypto.so" in maps


def _is_arcology_command() -> bool:
    """Whether this process is the ``arcology`` command (safe to re-execute)."""
    if Path(sys.argv[0]).name == "arcology":
        return True
    argv = sys.orig_argv
    return "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["arc.cli"]


def ensure_openssl_conf() -> bool:
    """Make OpenSSL read ``arc/openssl.cnf``, re-executing if needed.

    Call it at the very start of the ``arcology`` command, before any import
    that may load ``ssl`` or ``hashlib``.

    Returns:
        True when OpenSSL in this process reads the file (or will, on first
        use); False when OpenSSL was loaded before and the process could not
        be re-executed (a host program, or a second attempt).
    """
    wanted = str(OPENSSL_CONF_PATH)
    if wanted == _INHERITED_CONF:
        os.environ.pop(_REEXEC_MARK, None)
        return True
    if not _libcrypto_loaded():
        os.environ["OPENSSL_CONF"] = wanted
        return True
    if os.environ.get(_REEXEC_MARK) or not _is_arcology_command():
        return False
    environment = dict(os.environ, OPENSSL_CONF=wanted)
    environment[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
