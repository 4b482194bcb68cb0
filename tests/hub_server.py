"""A Hub-compatible HTTP server on loopback, for testing the real huggingface_hub client.

It serves in-memory fixture repos with the subset of the Hugging Face Hub API that
`huggingface_hub` (2.x) uses for listing, model info and downloads:

    GET  /api/models?filter=..&author=..&search=..&expand=..&limit=..
                                                        listing; Link: <..>; rel="next" pagination
    GET  /api/models/{repo}[/revision/{rev}]            model info (siblings, sha, gated, ...)
    HEAD /{repo}/resolve/{rev}/{file}                   X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}                   body, Range -> 206 + Content-Range

Large files (".safetensors" by default) are "LFS": resolve answers 302 to a CDN host, like the
real Hub. The CDN is a second listener on 127.0.0.2 (another origin), so clients must drop the
Authorization header on the redirect; the server records whether they did.

Access control mirrors the Hub: private repos answer 401 RepoNotFound without a granted token,
gated repos answer 401 (no token) or 403 (token without access) with X-Error-Code: GatedRepo
on file downloads (their metadata stays public). Unknown repos/revisions/files answer 404 with
the X-Error-Code huggingface_hub maps to RepositoryNotFoundError / RevisionNotFoundError /
EntryNotFoundError.

Faults are injected per repo (and optionally per file and method): an HTTP status N times
(429 with Retry-After, 500, 503, ...) or a delay before the reply. Body bytes served are
counted per (repo, file) so tests can assert what a client fetched.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
LISTING = "/api/models"  # pseudo repo id for faults on the listing route


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    last_modified: datetime


@dataclass
class Repo:
    repo_id: str
    commits: list[Commit]
    tags: list[str]
    card_data: dict
    gated: str | bool = False          # False | "auto" | "manual"
    private: bool = False
    library_name: str | None = None

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def commit_for(self, rev: str) -> Commit | None:
        if rev == "main":
            return self.head
        return next((c for c in self.commits if c.sha == rev), None)


@dataclass
class Fault:
    """Answer `status` (or just wait `delay` seconds first) for the next `times` matching requests."""

    repo_id: str
    filename: str | None = None     # None: any file and the API routes of this repo
    status: int | None = None
    times: int = 1                     # -1: forever
    retry_after: int | None = None
    delay: float = 0.0
    methods: tuple[str, ...] = ("GET", "HEAD")
    data_from: int | None = None    # only ranged reads starting at/after this byte (not headers)
    hits: int = 0

    def matches(self, repo_id: str, filename: str | None, method: str,
                range_start: int | None = None) -> bool:
        if self.data_from is not None and (range_start is None or range_start < self.data_from):
            return False
        return (self.repo_id == repo_id and self.times != 0 and method in self.methods
                and (self.filename is None or self.filename == filename))


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    repo_id: str | None
    filename: str | None
    status: int
    range: str | None
    authorized: bool                   # an Authorization header was sent
    host: str                          # "hub" or "cdn"
    at: float


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    grants: dict[str, set[str]] = field(default_factory=dict)   # token -> repo ids
    faults: list[Fault] = field(default_factory=list)
    served: dict[tuple[str, str], int] = field(default_factory=dict)
    sent: int = 0                      # body bytes of every reply (API JSON included)
    log: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeHub:
    """The server. `with FakeHub() as hub: os.environ["HF_ENDPOINT"] = hub.url`."""

    def __init__(self, *, page_size: int = 20, lfs_suffixes: tuple[str, ...] = (".safetensors",),
                 sizes: bool = True) -> None:
        self.state = HubState()
        self.page_size = page_size
        # False: file listings carry no sizes (Hub-compatible mirrors that omit them); the
        # resolve route's HEAD still answers Content-Length / X-Linked-Size.
        self.sizes = sizes
        self.lfs_suffixes = lfs_suffixes
        self._clock = 0
        # Commit shas are unique per server instance: caches keyed by (repo, sha), like the
        # checkpoint caches in long-lived Ray workers, must never see two contents for one sha.
        self._nonce = uuid.uuid4().hex
        self._servers: list[ThreadingHTTPServer] = []

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeHub:
        handler = _make_handler(self)
        hub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        cdn = ThreadingHTTPServer(("127.0.0.2", 0), handler)
        for srv in (hub, cdn):
            srv.daemon_threads = True          # slow-reply threads must not block shutdown
            srv.block_on_close = False
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._servers = [hub, cdn]
        self.url = f"http://127.0.0.1:{hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.2:{cdn.server_address[1]}"
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- content ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, base_model: str | None = None,
                 relation: str | None = None, tags: Iterable[str] = (),
                 card_data: dict | None = None, gated: str | bool = False,
                 private: bool = False, library_name: str | None = None) -> str:
        """A new repo with one commit. `relation` ("adapter", "finetune", ...) adds the Hub's
        derived tags base_model:<id> and base_model:<relation>:<id>; "adapter" also adds "peft"."""
        all_tags = list(tags)
        card = dict(card_data or {})
        if base_model:
            card.setdefault("base_model", base_model)
            all_tags.append(f"base_model:{base_model}")
            if relation:
                all_tags.append(f"base_model:{relation}:{base_model}")
        if relation == "adapter":
            all_tags.append("peft")
            library_name = library_name or "peft"
        with self.state.lock:
            if repo_id in self.state.repos:
                raise ValueError(f"repo {repo_id} exists; use commit()")
            commit = self._new_commit(repo_id, dict(files))
            self.state.repos[repo_id] = Repo(repo_id, [commit], list(dict.fromkeys(all_tags)),
                                             card, gated, private, library_name)
        return commit.sha

    def commit(self, repo_id: str, files: dict[str, bytes], delete: Iterable[str] = ()) -> str:
        """A new head commit: the previous files updated with `files`, minus `delete`."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            new = {**repo.head.files, **files}
            for name in delete:
                new.pop(name, None)
            commit = self._new_commit(repo_id, new)
            repo.commits.append(commit)
        return commit.sha

    def _new_commit(self, repo_id: str, files: dict[str, bytes]) -> Commit:
        self._clock += 1
        sha = hashlib.sha1(f"{self._nonce}:{repo_id}:{self._clock}".encode()).hexdigest()
        return Commit(sha, files, _EPOCH + timedelta(minutes=self._clock))

    def grant(self, token: str, *repo_ids: str) -> None:
        """Make `token` valid, with access to these gated/private repos."""
        with self.state.lock:
            self.state.grants.setdefault(token, set()).update(repo_ids)

    # --- faults and counters ---------------------------------------------------------------
    def inject(self, repo_id: str, filename: str | None = None, *, status: int | None = None,
               times: int = 1, retry_after: int | None = None, delay: float = 0.0,
               methods: tuple[str, ...] = ("GET", "HEAD"), data_from: int | None = None) -> Fault:
        """`data_from`: fault only ranged reads starting at/after this byte, e.g. a safetensors
        file's tensor data but not its header."""
        fault = Fault(repo_id, filename, status, times, retry_after, delay, methods, data_from)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def bytes_served(self, repo_id: str, filename: str | None = None) -> int:
        with self.state.lock:
            return sum(n for (r, f), n in self.state.served.items()
                       if r == repo_id and (filename is None or f == filename))

    def requests(self, repo_id: str | None = None, filename: str | None = None,
                 method: str | None = None) -> list[RequestRecord]:
        with self.state.lock:
            return [r for r in self.state.log
                    if (repo_id is None or r.repo_id == repo_id)
                    and (filename is None or r.filename == filename)
                    and (method is None or r.method == method)]

    def reset_counters(self) -> None:
        with self.state.lock:
            self.state.served.clear()
            self.state.log.clear()
            self.state.sent = 0

    def _take_fault(self, repo_id: str, filename: str | None, method: str,
                    range_start: int | None = None) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.matches(repo_id, filename, method, range_start):
                    fault.times -= 1 if fault.times > 0 else 0
                    fault.hits += 1
                    return fault
        return None


# --- request handling --------------------------------------------------------------------
def _etag(data: bytes, lfs: bool) -> str:
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """'bytes=a-b' / 'bytes=a-' / 'bytes=-n' -> inclusive (a, b); None if absent. Raises on bad."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError(header)
    first, _, last = spec.strip().partition("-")
    if first == "":
        n = int(last)
        return max(0, size - n), size - 1
    a = int(first)
    b = int(last) if last else size - 1
    if a >= size or b < a:
        raise ValueError(header)
    return a, min(b, size - 1)


def _range_start(header: str | None) -> int | None:
    """First byte of a 'bytes=a-b' request, None without one (or for a suffix range)."""
    spec = (header or "").partition("=")[2].strip()
    first = spec.partition("-")[0]
    return int(first) if first.isdigit() else None


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_GET(self) -> None:
            self._dispatch("GET")

        # -- plumbing --
        def _dispatch(self, method: str) -> None:
            self._status, self._repo, self._file = 0, None, None
            self._method, self._logged = method, False
            url = urlsplit(self.path)
            is_cdn = self.server.server_address[0] == "127.0.0.2"
            try:
                if is_cdn and url.path.startswith("/cdn/"):
                    self._cdn(method, url.path, parse_qs(url.query))
                elif url.path == "/api/models":
                    self._list(parse_qs(url.query))
                elif url.path.startswith("/api/models/"):
                    self._info(unquote(url.path[len("/api/models/"):]), parse_qs(url.query))
                elif "/resolve/" in url.path:
                    self._resolve(method, url.path)
                else:
                    self._error(404, "not a Hub route")
            except (BrokenPipeError, ConnectionResetError):
                pass                                   # the client gave up (timeout test)
            finally:
                self._log()                            # a request that got no response

        def _log(self) -> None:
            """Record this request once, before its response goes out: a client that has read
            the response must find its request in the log (a retry count checked right after)."""
            if self._logged:
                return
            self._logged = True
            is_cdn = self.server.server_address[0] == "127.0.0.2"
            with hub.state.lock:
                hub.state.log.append(RequestRecord(
                    self._method, self.path, self._repo, self._file, self._status,
                    self.headers.get("Range"), "authorization" in {k.lower() for k in self.headers},
                    "cdn" if is_cdn else "hub", time.monotonic()))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  method: str = "GET", count: bool = False) -> None:
            self._status = status
            self._log()
            self.send_response(status)
            hdrs = {"Content-Length": str(len(body)), **(headers or {})}
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD" and body:
                self.wfile.write(body)
                with hub.state.lock:
                    hub.state.sent += len(body)
                if count and self._repo is not None and self._file is not None:
                    with hub.state.lock:
                        key = (self._repo, self._file)
                        hub.state.served[key] = hub.state.served.get(key, 0) + len(body)

        def _json(self, status: int, obj: object, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, message: str, code: str | None = None,
                   headers: dict | None = None, method: str = "GET") -> None:
            hdrs = {"X-Error-Message": message, **(headers or {})}
            if code:
                hdrs["X-Error-Code"] = code
            body = json.dumps({"error": message}).encode()
            self._send(status, body, {"Content-Type": "application/json", **hdrs}, method=method)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[7:] if auth.startswith("Bearer ") else None

        def _can_see(self, repo: Repo) -> bool:
            token = self._token()
            return not repo.private or (token is not None and repo.repo_id in hub.state.grants.get(token, ()))

        def _fault(self, repo_id: str, filename: str | None, method: str) -> bool:
            """Apply an injected fault; True if the reply has been sent."""
            fault = hub._take_fault(repo_id, filename, method, _range_start(self.headers.get("Range")))
            if fault is None:
                return False
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is None:
                return False
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self._error(fault.status, f"injected {fault.status}", headers=headers, method=method)
            return True

        def _repo_or_error(self, repo_id: str, method: str) -> Repo | None:
            repo = hub.state.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound", method=method)
                return None
            if not self._can_see(repo):
                if self._token() is not None and self._token() not in hub.state.grants:
                    self._error(401, "Invalid credentials in Authorization header", method=method)
                else:  # the Hub hides private repos: same answer as a missing one
                    self._error(401, "Repository not found", "RepoNotFound", method=method)
                return None
            return repo

        # -- routes --
        def _list(self, q: dict[str, list[str]]) -> None:
            self._repo = LISTING
            if self._fault(LISTING, None, "GET"):
                return
            filters = q.get("filter", [])
            expand = q.get("expand")
            limit = int(q["limit"][0]) if "limit" in q else None
            offset = int(q.get("cursor", ["0"])[0])
            with hub.state.lock:
                repos = sorted(hub.state.repos.values(), key=lambda r: r.repo_id)
            author = q.get("author", [None])[0]
            search = (q.get("search", [""])[0] or "").lower()
            hits = [r for r in repos if self._can_see(r) and all(f in r.tags for f in filters)
                    and (author is None or r.repo_id.split("/")[0] == author)
                    and search in r.repo_id.lower()]
            if limit is not None:
                hits = hits[:limit]
            page = hits[offset: offset + hub.page_size]
            headers = {}
            if offset + hub.page_size < len(hits):
                nxt = [(k, v) for k, vs in q.items() if k != "cursor" for v in vs]
                nxt.append(("cursor", str(offset + hub.page_size)))
                headers["Link"] = f'<{hub.url}/api/models?{urlencode(nxt)}>; rel="next"'
            self._json(200, [_model_json(r, r.head, expand, blobs=False, hub=hub) for r in page], headers)

        def _info(self, rest: str, q: dict[str, list[str]]) -> None:
            repo_id, _, rev = rest.partition("/revision/")
            self._repo = repo_id
            if self._fault(repo_id, None, "GET"):
                return
            repo = self._repo_or_error(repo_id, "GET")
            if repo is None:
                return
            commit = repo.commit_for(unquote(rev) if rev else "main")
            if commit is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return
            blobs = q.get("blobs", ["false"])[0].lower() == "true"
            self._json(200, _model_json(repo, commit, q.get("expand"), blobs=blobs, hub=hub))

        def _resolve(self, method: str, path: str) -> None:
            repo_part, _, rest = path.lstrip("/").partition("/resolve/")
            repo_id = unquote(repo_part)
            rev, _, filename = rest.partition("/")
            rev, filename = unquote(rev), unquote(filename)
            self._repo, self._file = repo_id, filename
            if self._fault(repo_id, filename, method):
                return
            repo = self._repo_or_error(repo_id, method)
            if repo is None:
                return
            if repo.gated and repo.repo_id not in hub.state.grants.get(self._token() or "", ()):
                status = 401 if self._token() is None else 403
                self._error(status, f"Access to model {repo_id} is restricted", "GatedRepo", method=method)
                return
            commit = repo.commit_for(rev)
            if commit is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", method=method)
                return
            data = commit.files.get(filename)
            if data is None:
                self._error(404, "Entry not found", "EntryNotFound",
                            {"X-Repo-Commit": commit.sha}, method=method)
                return
            lfs = filename.endswith(hub.lfs_suffixes)
            etag = _etag(data, lfs)
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if lfs:  # like the Hub: redirect to a signed CDN URL on another origin
                # the file name escaped whole: a nested file (unet/...) stays one path segment
                loc = f"{hub.cdn_url}/cdn/{quote(repo_id)}/{commit.sha}/{quote(filename, safe='')}?X-Signature=fixture"
                headers.update({"Location": loc, "X-Linked-Size": str(len(data)),
                                "X-Linked-Etag": f'"{etag}"'})
                self._send(302, b"", headers, method=method)
                return
            self._body(method, data, headers)

        def _cdn(self, method: str, path: str, q: dict[str, list[str]]) -> None:
            parts = path[len("/cdn/"):].split("/")
            repo_id = unquote("/".join(parts[:-2]))
            sha, filename = parts[-2], unquote(parts[-1])
            self._repo, self._file = repo_id, filename
            if self._fault(repo_id, filename, method):
                return
            repo = hub.state.repos.get(repo_id)
            commit = repo.commit_for(sha) if repo else None
            if commit is None or filename not in commit.files or "X-Signature" not in q:
                self._error(403, "signature does not match", method=method)
                return
            data = commit.files[filename]
            self._body(method, data, {"ETag": f'"{_etag(data, True)}"', "Accept-Ranges": "bytes"})

        def _body(self, method: str, data: bytes, headers: dict) -> None:
            try:
                rng = _parse_range(self.headers.get("Range"), len(data))
            except ValueError:
                self._error(416, "Requested range not satisfiable",
                            headers={"Content-Range": f"bytes */{len(data)}"}, method=method)
                return
            if rng is None:
                self._send(200, data, headers, method=method, count=True)
                return
            a, b = rng
            headers = {**headers, "Content-Range": f"bytes {a}-{b}/{len(data)}"}
            self._send(206, data[a: b + 1], headers, method=method, count=True)

    return Handler


def _model_json(repo: Repo, commit: Commit, expand: list[str] | None, *, blobs: bool,
                hub: FakeHub) -> dict:
    siblings = []
    for name in sorted(commit.files):
        sib: dict = {"rfilename": name}
        if blobs and hub.sizes:
            data = commit.files[name]
            sib["size"] = len(data)
            sib["blobId"] = _etag(data, False)
            if name.endswith(hub.lfs_suffixes):
                sib["lfs"] = {"size": len(data), "sha256": _etag(data, True), "pointerSize": 134}
        siblings.append(sib)
    full = {
        "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.sha,
        "lastModified": commit.last_modified.isoformat().replace("+00:00", ".000Z"),
        "createdAt": repo.commits[0].last_modified.isoformat().replace("+00:00", ".000Z"),
        "private": repo.private,
        "gated": repo.gated,
        "disabled": False,
        "tags": repo.tags,
        "library_name": repo.library_name,
        "cardData": repo.card_data,
        "siblings": siblings,
        "downloads": 0,
        "likes": 0,
    }
    if expand:  # the Hub returns only the requested properties (plus ids)
        return {k: v for k, v in full.items() if k in ("_id", "id") or k in expand}
    return full
