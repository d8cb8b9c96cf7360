"""Listening sockets: addresses, options, refusals, the descriptor limit."""

from __future__ import annotations

import resource
import socket

import pytest

from arc.errors import BadInput
from arc.tls.listener import open_sockets, raise_fd_limit


def test_port_zero_opens_the_same_free_port_on_ipv4_and_ipv6() -> None:
    sockets = open_sockets(0, ["127.0.0.1", "::1"])
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        families = [sock.family for sock in sockets]
        options = [
            (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
                sock.getblocking(),
            )
            for sock in sockets
        ]
    finally:
        for sock in sockets:
            sock.close()

    assert len(ports) == 1
    assert families == [socket.AF_INET, socket.AF_INET6]
    assert options == [(1, 1, False)] * 2


def test_an_ipv6_address_the_host_lacks_is_skipped() -> None:
    sockets = open_sockets(0, ["127.0.0.1", "2001:db8::1"])
    try:
        addresses = [sock.getsockname()[0] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()

    assert addresses == ["127.0.0.1"]


def test_a_port_in_use_is_refused_with_the_os_reason() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(BadInput, match=rf"port {port}: .*in use"):
            open_sockets(port, ["127.0.0.1"])
    finally:
        taken.close()


def test_a_port_in_use_on_the_second_address_closes_the_first() -> None:
    taken = socket.socket(socket.AF_INET6)
    taken.bind(("::1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(BadInput, match="::1"):
            open_sockets(port, ["127.0.0.1", "::1"])
        # The IPv4 socket opened first was closed again: binding works.
        again = open_sockets(port, ["127.0.0.1"])
        for sock in again:
            sock.close()
    finally:
        taken.close()


@pytest.mark.parametrize(("port", "bind"), [(70000, ["127.0.0.1"]), (80, [])])
def test_bad_ports_and_empty_bind_lists_are_refused(port: int, bind: list[str]) -> None:
    with pytest.raises(BadInput):
        open_sockets(port, bind)


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    try:
        limit = raise_fd_limit()

        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == limit
        assert limit == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
