"""`pip install ARGS` that survives a registry connection cut off mid-file (docs/development.md, "Network").

Run with the target venv's python: `VENV/bin/python .ci/pip_install.py [pip install args]`. It works in three steps:

1. resolve: `pip install --dry-run --report` lists every file the install needs (small metadata requests only);
2. fetch: each file from the registry is downloaded into the wheelhouse (`$WHEELHOUSE`, default `.cache/wheelhouse`),
   resumed where a cut-off download stopped, after a pause that grows up to a minute, until `FETCH_DEADLINE`
   seconds (default 900) have passed for that file; then its sha256 is checked against the registry's;
3. install: exactly the resolved files, from the wheelhouse (and this machine's disk), with `--no-deps`: pip
   does not prefer a `--find-links` copy of a release over the registry's, so the resolved list is installed as is.

Files already in the wheelhouse are not downloaded again, so the venvs one CI run builds (main, newest releases,
Axolotl) download a shared release once. Steps 1 and 3 run through `.ci/retry` (a dropped index request).
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PIP = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
CHUNK = 1 << 20
RETRY = Path(__file__).with_name("retry")


class FetchError(RuntimeError):
    pass


def _run(cmd: list[str], what: str) -> None:
    """Run cmd through .ci/retry (again when it fails, as the Makefile's other registry commands)."""
    status = subprocess.call([str(RETRY), *cmd])
    if status != 0:
        raise FetchError(f"{what} failed (exit status {status}): {' '.join(cmd)}")


def resolve(args: list[str]) -> list[dict]:
    """What `pip install ARGS` would install: [{'url', 'sha256', 'name', 'editable'}], in pip's order."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _run([*PIP, "--dry-run", "--quiet", "--report", str(report), *args], "resolving")
        items = json.loads(report.read_text())["install"]
    files = []
    for item in items:
        info = item.get("download_info", {})
        url = info.get("url", "")
        files.append(
            {
                "url": url,
                "sha256": info.get("archive_info", {}).get("hashes", {}).get("sha256"),
                "name": urllib.parse.unquote(url.rsplit("/", 1)[-1].split("#", 1)[0]),
                "editable": bool(info.get("dir_info", {}).get("editable")),
            }
        )
    return files


def _remote(f: dict) -> bool:
    return f["url"].startswith(("http://", "https://"))


def targets(files: list[dict], wheelhouse: Path) -> list[str]:
    """pip install arguments for the resolved files: wheelhouse copies, local paths, `-e DIR` for an editable."""
    out: list[str] = []
    for f in files:
        if _remote(f):
            out.append(str(wheelhouse / f["name"]))
        elif f["url"].startswith("file://"):
            path = urllib.request.url2pathname(urllib.parse.urlparse(f["url"]).path)
            out.extend(["-e", path] if f["editable"] else [path])
        else:
            raise FetchError(f"cannot install {f['url']!r} from a file: only registry and local files are handled")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    url: str, dest: Path, sha256: str | None, deadline: float = 900.0, max_pause: float = 60.0, timeout: float = 60.0
) -> bool:
    """Download url to dest unless a file with that sha256 is there; True when it downloaded.

    A cut-off download resumes from the bytes it has (an HTTP Range request on a new connection); a server that
    answers a Range request with the whole file starts it again. Pauses between tries double from 2 s up to
    max_pause; after deadline seconds, FetchError.
    """
    if dest.exists() and (sha256 is None or _sha256(dest) == sha256):
        return False
    part = dest.with_name(dest.name + ".part")
    start, pause, attempt = time.monotonic(), 2.0, 0
    while True:
        attempt += 1
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                mode = "ab" if have and response.status == 206 else "wb"
                total = response.headers.get("Content-Length")
                with part.open(mode) as out:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                got = part.stat().st_size
                expected = (have if mode == "ab" else 0) + int(total) if total else got
                if got != expected:
                    raise FetchError(f"connection closed at {got} of {expected} bytes")
        except urllib.error.HTTPError as error:
            if error.code == 416:  # the part file is already whole (or longer than the file): start again
                part.unlink(missing_ok=True)
            elif error.code == 404:
                raise FetchError(f"{url}: 404 Not Found") from error
            failure: Exception = error
        except (OSError, FetchError) as error:
            failure = error
        else:
            if sha256 is None or _sha256(part) == sha256:
                part.replace(dest)
                return True
            part.unlink()
            failure = FetchError(f"sha256 differs from the registry's {sha256}")
        waited = time.monotonic() - start
        if waited + pause > deadline:
            raise FetchError(f"{dest.name}: gave up after {attempt} tries in {waited:.0f} s; last: {failure}")
        print(
            f"pip_install: {dest.name}: {failure} (try {attempt}); resuming in {pause:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(pause)
        pause = min(2 * pause, max_pause)


def main(args: list[str]) -> int:
    wheelhouse = Path(os.environ.get("WHEELHOUSE", ".cache/wheelhouse")).resolve()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    deadline = float(os.environ.get("FETCH_DEADLINE", "900"))
    try:
        files = resolve(args)
        if not files:
            return 0  # everything asked for is installed already
        remote = [f for f in files if _remote(f)]
        todo = [f for f in remote if not (wheelhouse / f["name"]).exists()]
        print(
            f"pip_install: {len(files)} to install, {len(remote)} from the registry, {len(todo)} of them to "
            f"download into {wheelhouse}",
            flush=True,
        )
        for f in remote:
            fetch(f["url"], wheelhouse / f["name"], f["sha256"], deadline=deadline)
        keep = [a for a in args if a == "--ignore-requires-python"]
        _run([*PIP, "--quiet", "--no-deps", *keep, *targets(files, wheelhouse)], "installing")
    except FetchError as error:
        print(f"pip_install: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
