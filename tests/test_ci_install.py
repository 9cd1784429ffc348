"""`.ci/pip_install.py`'s download step against a real local HTTP server that cuts connections mid-file.

The registry connection that failed CI twice stopped mid-file and pip's own resume attempts, made at once, got no
further; the installer resumes after a pause. These tests serve a file that is cut off on the first requests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pip_install", ROOT / ".ci" / "pip_install.py")
assert _spec and _spec.loader
pip_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pip_install)

BODY = bytes(range(256)) * 4096  # 1 MiB


class Flaky(BaseHTTPRequestHandler):
    cut_first = 2  # requests that stop a third of the way through what they promised
    honour_range = True
    requests: list[str | None] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        cls = type(self)
        cls.requests.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range") and cls.honour_range:
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        rest = BODY[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if len(cls.requests) <= cls.cut_first:
            self.wfile.write(rest[: len(rest) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # cut the connection mid-file
            return
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    def make(cut_first: int = 2, honour_range: bool = True) -> str:
        handler = type("Handler", (Flaky,), {"cut_first": cut_first, "honour_range": honour_range, "requests": []})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append((httpd, handler))
        return f"http://127.0.0.1:{httpd.server_address[1]}/pkg-1.0-py3-none-any.whl"

    servers: list = []
    yield make, servers
    for httpd, _ in servers:
        httpd.shutdown()
        httpd.server_close()


SHA = hashlib.sha256(BODY).hexdigest()


def test_a_cut_off_download_resumes_where_it_stopped(server, tmp_path):
    make, servers = server
    url = make(cut_first=2)
    dest = tmp_path / "pkg-1.0-py3-none-any.whl"
    assert pip_install.fetch(url, dest, SHA, deadline=30, max_pause=0.1) is True
    assert dest.read_bytes() == BODY
    assert not dest.with_name(dest.name + ".part").exists()
    ranges = servers[0][1].requests
    # the first request is whole; each resume asks only for the bytes still missing
    assert ranges[0] is None and len(ranges) == 3
    assert ranges[1] == f"bytes={len(BODY) // 3}-"
    assert int(ranges[2].split("=")[1].rstrip("-")) > len(BODY) // 3


def test_a_server_that_ignores_range_starts_the_file_again(server, tmp_path):
    make, servers = server
    dest = tmp_path / "pkg-1.0-py3-none-any.whl"
    assert pip_install.fetch(make(cut_first=1, honour_range=False), dest, SHA, deadline=30, max_pause=0.1)
    assert dest.read_bytes() == BODY


def test_a_file_already_in_the_wheelhouse_is_not_downloaded_again(server, tmp_path):
    make, servers = server
    dest = tmp_path / "pkg-1.0-py3-none-any.whl"
    dest.write_bytes(BODY)
    assert pip_install.fetch(make(), dest, SHA, deadline=30) is False
    assert servers[0][1].requests == []


def test_a_wrong_hash_and_a_dead_connection_give_up_with_the_reason(server, tmp_path):
    make, _ = server
    dest = tmp_path / "pkg-1.0-py3-none-any.whl"
    with pytest.raises(pip_install.FetchError, match="sha256 differs"):
        pip_install.fetch(make(cut_first=0), dest, "0" * 64, deadline=0.5, max_pause=0.1)
    assert not dest.exists()
    with pytest.raises(pip_install.FetchError, match=r"gave up after \d+ tries.*connection closed at"):
        pip_install.fetch(make(cut_first=10**6), dest, SHA, deadline=0.5, max_pause=0.1)
    assert not dest.exists()


def test_the_resolved_files_become_install_arguments(tmp_path):
    files = [
        {"url": "https://files.example/p/a-1.0-py3-none-any.whl", "name": "a-1.0-py3-none-any.whl", "editable": False},
        {"url": "file:///opt/wheels/torch-2.13.0%2Bcpu-cp311-cp311-linux_x86_64.whl", "name": "", "editable": False},
        {"url": "file:///work/main", "name": "main", "editable": True},
    ]
    assert pip_install.targets(files, tmp_path) == [
        str(tmp_path / "a-1.0-py3-none-any.whl"),
        "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl",
        "-e",
        "/work/main",
    ]
    with pytest.raises(pip_install.FetchError, match="only registry and local files"):
        pip_install.targets([{"url": "git+https://x/y", "name": "y", "editable": False}], tmp_path)
