"""The embedding API: a proxy running in a thread of the test process itself."""

import threading
from typing import List

import pytest
from conftest import DEADLINE, TcpServer
from websockets.sync.client import connect

import websockify_min


def test_start_address_and_stop_in_a_thread(echo_server: TcpServer) -> None:
    options = websockify_min.parse_args(["127.0.0.1:0", echo_server.target])
    server = websockify_min.Server(options)
    server.start()
    try:
        host, port = server.address[:2]
        assert host == "127.0.0.1" and port > 0
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send(b"embedded")
            assert ws.recv(DEADLINE) == b"embedded"
            assert server.session_count == 1
    finally:
        server.stop()
    assert not any(thread.name == "websockify-min" for thread in threading.enumerate())


def test_options_built_directly_and_derived(echo_server: TcpServer) -> None:
    base = websockify_min.Options(
        listen_host="127.0.0.1", target_host="127.0.0.1", target_port=echo_server.port
    )
    server = websockify_min.Server(base._replace(heartbeat=30.0))
    server.start()
    try:
        with connect(f"ws://127.0.0.1:{server.address[1]}/") as ws:
            ws.send("derived")
            assert ws.recv(DEADLINE) == b"derived"
    finally:
        server.stop()


def test_startup_problems_raise_config_error() -> None:
    with pytest.raises(websockify_min.ConfigError, match="--token-plugin"):
        websockify_min.Server(websockify_min.Options(listen_port=0, token_plugin="NoSuchPlugin"))
    with pytest.raises(websockify_min.ConfigError, match="Too few arguments"):
        websockify_min.parse_args(["6080"])


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "6080", "localhost:5900"],
        ["6080", "-v", "localhost:5900"],
        ["6080", "localhost:5900", "-v"],
    ],
)
def test_options_may_come_between_the_addresses(argv: List[str]) -> None:
    options = websockify_min.parse_args(argv)  # as upstream's optparse takes them
    assert (options.listen_port, options.target_host, options.target_port) == (
        6080,
        "localhost",
        5900,
    )
    assert options.verbose


@pytest.mark.parametrize(
    ("start", "field", "value"),
    [
        (["--tr"], "traffic", True),  # not --trusted-proxy, which upstream lacks
        (["--re", "rec"], "record", "rec"),  # not --rebind
        (["--ssl-targ"], "ssl_target", True),  # not --ssl-target-cafile
        (["--key-pass=pw"], "key_password", "pw"),  # not --key-password-file or -env
        (["--trusted", "10.0.0.1"], "trusted_proxy", ("10.0.0.1/32",)),  # ours still work
        (["--work", "2"], "workers", 2),
    ],
)
def test_a_start_of_an_upstream_option_means_that_option(
    start: List[str], field: str, value: object
) -> None:
    options = websockify_min.parse_args([*start, "6080", "localhost:5900"])
    assert getattr(options, field) == value


def test_a_start_shared_by_upstream_options_is_still_ambiguous() -> None:
    with pytest.raises(websockify_min.ConfigError, match="ambiguous option: --ke"):
        websockify_min.parse_args(["--ke", "x", "6080", "localhost:5900"])


def test_unknown_options_between_the_addresses_are_errors() -> None:
    with pytest.raises(websockify_min.ConfigError, match="unrecognized arguments: --bogus"):
        websockify_min.parse_args(["6080", "--bogus", "localhost:5900"])
    with pytest.raises(websockify_min.ConfigError, match="Too many arguments"):
        websockify_min.parse_args(["6080", "-v", "localhost:5900", "extra"])
