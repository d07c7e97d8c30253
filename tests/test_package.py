"""The ways to ship the proxy: the zipapp, the pip package, a vendored copy (README's example)."""

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import (
    DEADLINE,
    PROXY_PYTHON,
    PROXY_SCRIPT,
    ROOT,
    ProxyFactory,
    TcpServer,
    env_with_module,
    free_port,
    make,
    run_captured,
)
from websockets.sync.client import connect


@pytest.fixture(scope="session")
def zipapp() -> Path:
    return make("websockify.pyz")


def echo_through(port: int, message: bytes, path: str = "/") -> None:
    with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=DEADLINE) as ws:
        ws.send(message)
        assert ws.recv(DEADLINE) == message


def test_zipapp_answers_like_the_script(zipapp: Path) -> None:
    assert zipapp.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    for args in (["--version"], ["--help"], ["--heartbeat", "soon", "6080"], ["6080"]):
        script = run_captured([PROXY_PYTHON, str(PROXY_SCRIPT), *args])
        packed = run_captured([PROXY_PYTHON, str(zipapp), *args])
        assert (packed.returncode, packed.stdout, packed.stderr) == (
            script.returncode,
            script.stdout,
            script.stderr,
        ), args
    assert run_captured([PROXY_PYTHON, str(zipapp), "6080"]).returncode == 2


def test_zipapp_runs_by_its_shebang(zipapp: Path) -> None:
    result = run_captured([str(zipapp), "--version"])
    assert result.returncode == 0 and result.stdout.startswith("websockify_min.py "), result


# A plugin written for upstream that also uses this module by name.
USER_PLUGIN = """
import websockify_min
from websockify.auth_plugins import AuthenticationError
from websockify.token_plugins import BasePlugin

assert BasePlugin is websockify_min.BaseTokenPlugin, "a second copy of websockify_min"


class Echo(BasePlugin):
    def lookup(self, token):
        return ("127.0.0.1", self.source) if token == "echo" else None


class Knock(websockify_min.BaseAuthPlugin):
    def authenticate(self, headers, target_host, target_port):
        if headers.get("X-Knock") != "knock":
            raise AuthenticationError(response_code=418, response_msg="Who is there")
"""


@pytest.mark.smoke
def test_user_plugins_import_websockify_and_this_module(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    """From the zipapp too: the version matrix runs this with WSMIN_SCRIPT naming it."""
    env = env_with_module(tmp_path / "plugins", "my_plugins", USER_PLUGIN)
    port = free_port()
    args = ["--token-plugin", "my_plugins.Echo", "--token-source", str(echo_server.port)]
    args += ["--auth-plugin", "my_plugins.Knock", f"127.0.0.1:{port}"]
    start_proxy(*args, env=env, listen=("127.0.0.1", port))

    with connect(
        f"ws://127.0.0.1:{port}/?token=echo",
        additional_headers={"X-Knock": "knock"},
        open_timeout=DEADLINE,
    ) as ws:
        ws.send(b"plugged in")
        assert ws.recv(DEADLINE) == b"plugged in"
    with pytest.raises(Exception, match="418"):
        echo_through(port, b"no knock", "/?token=echo")


def build_venv(tmp_path: Path) -> Path:
    """`pip install` of this project, offline: build its wheel, install it in a new venv."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "websockify_min.py"):
        shutil.copy(str(ROOT / name), str(source / name))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    offline = ["-q", "--no-deps", "--no-index"]
    dist = tmp_path / "dist"
    built = run_captured(
        [*pip, "wheel", *offline, "--no-build-isolation", "-w", str(dist), str(source)]
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("websockify_min-*.whl")
    venv = tmp_path / "venv"
    created = run_captured([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert created.returncode == 0, created.stderr
    installed = run_captured(
        [*pip, "--python", str(venv / "bin" / "python"), "install", *offline, str(wheel)]
    )
    assert installed.returncode == 0, installed.stderr
    return venv


@pytest.mark.slow
def test_pip_install_gives_a_command_and_a_module(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    venv = build_venv(tmp_path)
    command, python = venv / "bin" / "websockify-min", venv / "bin" / "python"
    # Not the source tree, whose module would shadow it.
    elsewhere: Dict[str, Any] = {"cwd": str(tmp_path)}
    version = run_captured([str(command), "--version"], **elsewhere)
    assert version.returncode == 0 and re.fullmatch(r"websockify_min.py \S+\n", version.stdout)
    located = run_captured(
        [str(python), "-c", "import websockify_min; print(websockify_min.__file__)"], **elsewhere
    )
    assert located.stdout.startswith(str(venv)), located

    for runner in ([str(command)], [str(python), "-m", "websockify_min"]):
        port = free_port()
        args = (f"127.0.0.1:{port}", echo_server.target)
        start_proxy(*args, command=runner, cwd=tmp_path, listen=("127.0.0.1", port))
        echo_through(port, b"installed")


def readme_example() -> str:
    """The Python example of README.md's Embedding section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Embedding\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python example under Embedding in README.md"
    return match.group(1)


@pytest.mark.smoke
def test_readme_embedding_example_runs_from_a_vendored_copy(
    echo_server: TcpServer, tmp_path: Path
) -> None:
    example = readme_example()
    assert example.count('"127.0.0.1:5900"') == 1  # the target this test points elsewhere
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(str(PROXY_SCRIPT), str(project / "websockify_min.py"))
    app = project / "gateway.py"
    app.write_text(example.replace('"127.0.0.1:5900"', repr(echo_server.target)))
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [PROXY_PYTHON, str(app)],
        cwd=str(tmp_path),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        lines: List[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(DEADLINE)
        assert lines, "the example printed nothing"
        url = re.fullmatch(rb"noVNC can connect to ws://127\.0\.0\.1:(\d+)/websockify\n", lines[0])
        assert url, lines[0]
        echo_through(int(url.group(1)), b"vendored", "/websockify")
        proc.stdin.write(b"\n")
        proc.stdin.close()
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
