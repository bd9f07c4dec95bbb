"""A loopback Hub-compatible HTTP server for tests: real huggingface_hub uploads and downloads, no network.

It answers the calls `HfApi.create_repo` + `upload_folder` make (create repo, preupload, NDJSON
commit, YAML validation, whoami) with every file uploaded "regular" (inline base64, no LFS/xet),
and the calls `hf_hub_download` / `snapshot_download` / `from_pretrained` make to download
(`/api/models/{repo}[/revision/{rev}]`, HEAD/GET `/{repo}/resolve/{rev}/{path}`). Repositories
live in memory: `server.repos[repo_id].files` maps paths to bytes.

    with HubServer(token="hf_test") as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("user/model")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class HubServer:
    """Threaded loopback Hub. `requests` logs (method, path) of every call, `repos` holds the repositories."""

    def __init__(self, token: str | None = None, user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing
    def _dispatch(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        try:
            for route_method, pattern, handler in _ROUTES:
                match = pattern.match(path)
                if match and route_method == method:
                    return getattr(self, "_" + handler)(match, body, method)
            raise _HTTPError(404, f"no route for {method} {path}")
        except _HTTPError as err:
            self._send_json({"error": str(err)}, err.status, head=method == "HEAD",
                            extra={"X-Error-Message": str(err)})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _send(self, data: bytes, status: int = 200, content_type: str = "application/json", head: bool = False,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_json(self, obj: object, status: int = 200, head: bool = False,
                   extra: dict[str, str] | None = None) -> None:
        self._send(json.dumps(obj).encode(), status, head=head, extra=extra)

    def _require_token(self) -> None:
        if self.hub.token is None:
            return
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _HTTPError(404, f"Repository not found: {repo_id}")
        if repo.private:
            self._require_token()
        return repo

    def _check_rev(self, repo: Repo, rev: str | None) -> None:
        if rev not in (None, "main", repo.sha):
            raise _HTTPError(404, f"Invalid rev id: {rev}")

    # -- upload endpoints
    def _create_repo(self, match, body: bytes, method: str) -> None:
        self._require_token()
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        if not name or payload.get("type", "model") not in (None, "model"):
            raise _HTTPError(400, f"bad create request {payload}")
        repo_id = f"{org}/{name}" if org else f"{self.hub.user}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send_json({"error": "You already created this model repo", "url": url}, 409)
            self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _preupload(self, match, body: bytes, method: str) -> None:
        self._require_token()
        repo = self._repo(match["repo"])
        self._check_rev(repo, match["rev"])
        files = json.loads(body)["files"]
        answer = []
        for entry in files:
            existing = repo.files.get(entry["path"])
            oid = hashlib.sha1(b"blob %d\0" % len(existing) + existing).hexdigest() if existing is not None else None
            answer.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answer, "commitOid": repo.sha})

    def _commit(self, match, body: bytes, method: str) -> None:
        self._require_token()
        repo = self._repo(match["repo"])
        self._check_rev(repo, match["rev"])
        if "ndjson" not in (self.headers.get("Content-Type") or ""):
            raise _HTTPError(400, "commit payload must be application/x-ndjson")
        header, added, deleted = None, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HTTPError(400, f"unsupported encoding {value.get('encoding')}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                raise _HTTPError(400, f"this test server only accepts regular files, got {key!r}")
        if header is None or not header.get("summary"):
            raise _HTTPError(400, "commit without a header/summary")
        with self.hub.lock:
            repo.files.update(added)
            for path in deleted:
                repo.files.pop(path, None)
            oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{sorted(added)}".encode()).hexdigest()
            repo.commits.append({"oid": oid, "summary": header["summary"], "files": sorted(added)})
        self._send_json({"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def _validate_yaml(self, match, body: bytes, method: str) -> None:
        content = json.loads(body).get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                front = content.split("---", 2)[1]
                if not isinstance(yaml.safe_load(front) or {}, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except (IndexError, yaml.YAMLError) as err:
                errors.append({"message": f"invalid YAML: {err}"})
        status = 400 if errors else 200
        self._send_json({"errors": errors, "warnings": []}, status)

    def _whoami(self, match, body: bytes, method: str) -> None:
        self._require_token()
        self._send_json({"type": "user", "name": self.hub.user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    # -- download endpoints
    def _model_info(self, match, body: bytes, method: str) -> None:
        repo = self._repo(match["repo"])
        self._check_rev(repo, match["rev"])
        self._send_json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha, "private": repo.private,
                         "siblings": [{"rfilename": path} for path in sorted(repo.files)], "tags": []})

    def _resolve(self, match, body: bytes, method: str) -> None:
        repo = self._repo(match["repo"])
        self._check_rev(repo, match["rev"])
        data = repo.files.get(match["path"])
        if data is None:
            raise _HTTPError(404, f"Entry not found: {match['path']}")
        etag = hashlib.sha256(data).hexdigest()
        self._send(data, content_type="application/octet-stream", head=method == "HEAD",
                   extra={"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha})
