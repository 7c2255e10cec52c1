"""Datasets by Hugging Face repo id, against a local stand-in for the Hub (HF_ENDPOINT): download into the
standard cache, the same id offline from that cache, local folders first, and one-line errors.

The stand-in serves the HTTP API that huggingface_hub's ``snapshot_download`` uses: the revision endpoint
(commit sha and file list), the recursive tree listing, and ``resolve/<revision>/<path>`` with the
X-Repo-Commit / ETag headers. The commands run in subprocesses: huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported, as it does for a user.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from damvla.data.hub import parse_repo_id, resolve_dataset
from test_train_cli import FAST, write_dataset

REPO = "lerobot/tiny_pick"
SRC = str(Path(__file__).resolve().parents[1] / "src")


class FakeHub:
    """Dataset repos served over HTTP like the Hub: ``repos[repo_id] = (refs, commits)`` where refs maps a
    branch or tag to a commit sha and commits map a sha to ``{path: bytes}``."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[dict[str, str], dict[str, dict[str, bytes]]]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

            def do_GET(self) -> None:
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        sha = hashlib.sha1(b"".join(k.encode() + v for k, v in files.items())).hexdigest()
        have_refs, commits = self.repos.setdefault(repo_id, ({}, {}))
        commits[sha] = files
        have_refs.update(dict.fromkeys(refs, sha))
        return sha

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(h.path)
        self.requests.append(f"{h.command} {url.path}")
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        # /api/datasets/<ns>/<name>[/revision/<rev>] | /api/datasets/<ns>/<name>/tree/<rev>
        # /datasets/<ns>/<name>/resolve/<rev>/<path...>
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo, rest, api = "/".join(parts[2:4]), parts[4:], True
        elif parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            repo, rest, api = "/".join(parts[1:3]), parts[3:], False
        else:
            return self.reply(h, 404, {"error": "not found"}, body)
        if repo not in self.repos:
            return self.reply(h, 404, {"error": "Repository not found"}, body, {"X-Error-Code": "RepoNotFound"})
        refs, commits = self.repos[repo]
        rev = rest[1] if len(rest) >= 2 else "main"
        sha = rev if rev in commits else refs.get(rev)
        if sha is None:
            return self.reply(h, 404, {"error": "Invalid rev id"}, body, {"X-Error-Code": "RevisionNotFound"})
        files = commits[sha]
        if api and rest[:1] == ["tree"]:
            tree = [{"type": "file", "oid": blob_sha(v), "size": len(v), "path": k} for k, v in files.items()]
            return self.reply(h, 200, tree, body)
        if api:
            siblings = [{"rfilename": k} for k in files]
            return self.reply(h, 200, {"id": repo, "sha": sha, "private": False, "siblings": siblings}, body)
        path = "/".join(rest[2:])
        if path not in files:
            return self.reply(h, 404, {"error": "Entry not found"}, body,
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})  # fmt: skip
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        self.send(h, 200, data, body, headers)

    def reply(self, h: BaseHTTPRequestHandler, code: int, doc: object, body: bool,
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.send(h, code, json.dumps(doc).encode(), body, {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def blob_sha(data: bytes) -> str:
    """Git's blob id, which the Hub uses as the ETag of files stored without LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def damvla(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from damvla.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.fixture
def hf_env(tmp_path: Path) -> dict[str, str]:
    """A fresh Hugging Face home (its hub cache inside), no token, no inherited offline switch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")  # fmt: skip
    return env


def test_repo_id_downloads_into_the_hf_cache_then_trains_offline_after_the_hub_is_gone(
    tmp_path: Path, hf_env: dict[str, str]
) -> None:
    ds = write_dataset(tmp_path / "made" / "ds")
    with FakeHub() as hub:
        old = hub.add(REPO, ds, refs=("v3.0",))
        (ds / "README.md").write_text("a newer commit on main\n")
        new = hub.add(REPO, ds, refs=("main",))
        online = {**hf_env, "HF_ENDPOINT": hub.url}
        out = damvla("data", "check", REPO, "--no-decode", env=online, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        snapshot = tmp_path / "hf" / "hub" / "datasets--lerobot--tiny_pick" / "snapshots" / new
        assert f"dataset {REPO}@main: commit {new[:12]}, {snapshot}" in out.stdout
        assert "dataset OK" in out.stdout
        assert (snapshot / "meta" / "info.json").is_file() and (snapshot / "README.md").is_file()
        assert any(r.startswith("GET /datasets/lerobot/tiny_pick/resolve/") for r in hub.requests)

        out = damvla("data", "check", f"{REPO}@v3.0", "--no-decode", env=online, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"commit {old[:12]}" in out.stdout and not (snapshot.parent / old / "README.md").exists()

    # The hub is gone: the same ids work from the cache with HF_HUB_OFFLINE=1 (train end to end), and a
    # revision never downloaded is refused saying what to do.
    offline = {**hf_env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"}
    out = damvla("train", "--preset", "tiny", "--dataset", REPO, "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "2", "--num-workers", "0", "--warmup", "1", "--threads", "1", *FAST,
                 env=offline, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"dataset {REPO}@main: commit {new[:12]}, {snapshot} (HF_HUB_OFFLINE=1: from the cache)" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()

    out = damvla("data", "check", f"{REPO}@v3.0", "--no-decode", env=offline, cwd=tmp_path)
    assert out.returncode == 0 and f"commit {old[:12]}" in out.stdout, out.stderr

    out = damvla("data", "check", f"{REPO}@v2.1", "--no-decode", env=offline, cwd=tmp_path)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith(f"damvla data: error: {REPO}@v2.1: no such folder, and HF_HUB_OFFLINE=1")
    assert "not in the Hugging Face cache" in err and "without HF_HUB_OFFLINE" in err


def test_unknown_repo_revision_and_unreachable_hub_are_one_line_errors(tmp_path: Path, hf_env: dict[str, str]) -> None:
    ds = write_dataset(tmp_path / "made" / "ds", lengths=(6, 5))
    with FakeHub() as hub:
        hub.add(REPO, ds)
        old = tmp_path / "made" / "v21" / "meta"
        old.mkdir(parents=True)
        (old / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 10}))
        hub.add("lerobot/old_format", old.parent)
        online = {**hf_env, "HF_ENDPOINT": hub.url}
        cases = {
            "lerobot/old_format": "holds a LeRobot v2.1 dataset and damvla reads v3.x: pick a revision in that "
            "format (LeRobot tags them, e.g. lerobot/old_format@v3.0)",
            "lerobot/nothing_here": f"the Hugging Face Hub ({hub.url}) has no dataset 'lerobot/nothing_here'",
            f"{REPO}@v9.9": f"the Hugging Face dataset '{REPO}' ({hub.url}) has no revision 'v9.9'",
        }
        for spec, expected in cases.items():
            out = damvla("data", "check", spec, "--no-decode", env=online, cwd=tmp_path)
            assert out.returncode == 1, out.stdout
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"damvla data: error: {spec}: "), out.stderr
            assert expected in lines[0]
    # Server gone, not offline, nothing cached: unreachable, named as such.
    out = damvla("data", "check", REPO, "--no-decode", env={**hf_env, "HF_ENDPOINT": hub.url}, cwd=tmp_path)
    assert out.returncode == 1
    assert f"the Hugging Face Hub ({hub.url}) could not be reached" in out.stderr
    assert "it is not in the Hugging Face cache" in out.stderr


def test_an_existing_local_folder_wins_over_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = write_dataset(tmp_path / "lerobot" / "tiny_pick", lengths=(6, 5))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("an existing folder must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert resolve_dataset(REPO) == Path(REPO)
    assert resolve_dataset(str(local)) == local
    assert resolve_dataset("not/a/repo/id") == Path("not/a/repo/id")  # left to the reader: "not found"


def test_which_arguments_read_as_repo_ids() -> None:
    assert parse_repo_id("lerobot/pusht") == ("lerobot/pusht", None)
    assert parse_repo_id("lerobot/pusht@v3.0") == ("lerobot/pusht", "v3.0")
    assert parse_repo_id("me/ds@refs/pr/1") == ("me/ds", "refs/pr/1")
    for spec in ("/data/ds", "./ds/x", "~/ds/x", "ds", "a/b/c", "../a/b", "a/b@", "a--b/c", "a/b..c"):
        assert parse_repo_id(spec) is None, spec
