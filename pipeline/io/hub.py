"""The Hugging Face Hub as a checkpoint source: discovery, pinned revisions, ranged reads.

    found = discover(["meta-llama/Llama-3.1-8B"], include_full=False, limit=100)
    for entry in found.entries:                 # every repo pinned to its commit sha
        src = HubFileSource(entry.repo_id, entry.sha)
    base = HubFileSource("meta-llama/Llama-3.1-8B", pin("meta-llama/Llama-3.1-8B"))
    base.read_range("model-00001-of-00004.safetensors", start, end)   # one HTTP Range request

Everything goes through huggingface_hub, so its standard configuration applies: HF_ENDPOINT,
tokens from HF_TOKEN or `hf auth login` (never stored here, never in messages or logs), the
Hugging Face cache (HF_HOME / HF_HUB_CACHE), HF_HUB_OFFLINE. Small files (configs, adapter
weights) are downloaded into the cache; other weight files are read by byte ranges unless the
cache already holds them. Transient failures (429 honouring Retry-After, 5xx, timeouts) get
bounded retries with backoff; then a typed HubError. Discovery turns a failure for one repo into
an `errors` row and goes on.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal, TypeVar

from ..errors import (
    BaseMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    HubAccessError,
    HubError,
    HubNotFoundError,
    HubUnavailableError,
    HubUnreachableError,
    UnsafeCheckpointError,
    ZoospectraError,
    error_row,
    redact,
)
from .identity import Pinned

if TYPE_CHECKING:
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import ExpandModelProperty_T, ModelInfo

logger = logging.getLogger("zoospectra.io.hub")
T = TypeVar("T")

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# Files fetched whole into the HF cache; every other file is read by byte ranges.
WHOLE_FILES = ("adapter_model.safetensors",)
WHOLE_SUFFIXES = (".json", ".txt", ".md")
# Expanded listing properties: enough to pin, filter and catalog without one call per repo.
LIST_EXPAND: list[ExpandModelProperty_T] = ["sha", "siblings", "gated", "lastModified", "private",
                                            "cardData", "tags"]   # tags: "lora" marks image-model LoRAs


@dataclass(frozen=True)
class HubOptions:
    """How to talk to the Hub. Picklable (Ray ships it to workers) and token-free by design.

    endpoint:   None = HF_ENDPOINT from the environment at call time, else huggingface.co.
    token:      None = huggingface_hub's standard resolution (HF_TOKEN, `hf auth login`);
                False = anonymous. There is no field for a token string on purpose.
    cache_dir:  None = the Hugging Face cache (HF_HUB_CACHE / HF_HOME).
    timeout:    seconds per request (connect and read).
    max_retries, backoff, backoff_max: retries after the first try, exponential backoff.
    retry_after_max: cap on a server's Retry-After (a crawl must not sleep for an hour).
    """

    endpoint: str | None = None
    token: bool | None = None
    cache_dir: str | None = None
    timeout: float = 30.0
    max_retries: int = 4
    backoff: float = 1.0
    backoff_max: float = 30.0
    retry_after_max: float = 120.0

    def resolved_endpoint(self) -> str:
        from huggingface_hub import constants

        return (self.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    def resolved_cache_dir(self) -> str:
        from huggingface_hub import constants

        return self.cache_dir or constants.HF_HUB_CACHE


# --- errors and retries ------------------------------------------------------------------
def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _server_reason(err: BaseException) -> str:
    """Status code and the server's own short message; never the request (it holds the token)."""
    response = getattr(err, "response", None)
    if response is None:
        return type(err).__name__
    msg = response.headers.get("X-Error-Message") or ""
    return redact(f"HTTP {response.status_code}" + (f" ({msg})" if msg else ""))


def _retry_wait(err: BaseException, attempt: int, options: HubOptions) -> float | None:
    """Seconds to wait before retrying `err`, or None if it is not transient."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    transient = isinstance(err, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))
    status = _status(err) if isinstance(err, HfHubHTTPError) else None
    if not transient and status not in RETRY_STATUS:
        return None
    response = getattr(err, "response", None)
    retry_after = response is not None and response.headers.get("Retry-After")
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after), options.retry_after_max)
    wait = min(options.backoff_max, options.backoff * 2**attempt)
    return wait * (1 + 0.25 * random.random())  # jitter: many workers must not retry in lockstep


def _typed(err: BaseException, what: str, ctx: dict) -> HubError | None:
    """The HubError for a non-transient failure, or None if `err` is not a Hub failure."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reason = _server_reason(err)
    login = "authenticate with HF_TOKEN or `hf auth login` using a token that can read it"
    if isinstance(err, GatedRepoError):
        return HubAccessError(f"{what}: gated repo ({reason}); request access on its Hub page and "
                              f"{login}", **ctx)
    if isinstance(err, RepositoryNotFoundError):
        if _status(err) == 401:
            return HubAccessError(f"{what}: repo is private or does not exist ({reason}); check the "
                                  f"repo id, or {login}", **ctx)
        return HubNotFoundError(f"{what}: repo not found ({reason}); check the repo id", **ctx)
    if isinstance(err, RevisionNotFoundError):
        return HubNotFoundError(f"{what}: revision not found ({reason}); the commit may have been "
                                "rewritten: rediscover the repo to pin its current sha", **ctx)
    if isinstance(err, EntryNotFoundError):
        return HubNotFoundError(f"{what}: file not found at this revision ({reason})", **ctx)
    if isinstance(err, OfflineModeIsEnabled):
        return HubUnavailableError(f"{what}: HF_HUB_OFFLINE is set and the file is not in the "
                                   "local cache; unset HF_HUB_OFFLINE or pre-fill the cache", **ctx)
    if isinstance(err, HfHubHTTPError):
        status = _status(err)
        if status in (401, 403):
            return HubAccessError(f"{what}: access denied ({reason}); {login}", **ctx)
        if status == 404:
            return HubNotFoundError(f"{what}: not found ({reason})", **ctx)
        if status is not None and status >= 500 or status in RETRY_STATUS:
            return HubUnavailableError(f"{what}: Hub unavailable ({reason}); retry later", **ctx)
        return HubError(f"{what}: Hub request failed ({reason})", **ctx)
    return None


def with_retries(fn: Callable[[], T], what: str, options: HubOptions, **ctx: object) -> T:
    """Run one Hub call with bounded retries; raise a typed HubError when it fails for good."""
    for attempt in range(options.max_retries + 1):
        try:
            return fn()
        except ZoospectraError:
            raise
        except Exception as err:  # noqa: BLE001 -- classified just below, unknown ones re-raised
            wait = _retry_wait(err, attempt, options)
            if wait is None:
                typed = _typed(err, what, ctx)
                if typed is None:
                    raise
                raise typed from None  # the chained request object carries the token header
            if attempt == options.max_retries:
                raise HubUnavailableError(
                    f"{what}: still failing after {attempt + 1} tries ({_server_reason(err)}); the "
                    "Hub is overloaded or down: retry the crawl later", tries=attempt + 1, **ctx
                ) from None
            logger.warning("%s %s: %s; retry %d/%d in %.2fs", what, _where(ctx), _server_reason(err),
                           attempt + 1, options.max_retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


PROBE_TIMEOUT_S = 10.0


def probe_endpoint(options: HubOptions) -> None:
    """One bounded resolve + connect to the endpoint before any repo is asked. Without it, no
    network looked like a Hub failure of every repo: rows blaming repos for a DNS failure, after
    minutes of retries. Skipped under HF_HUB_OFFLINE (then only the cache is read)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = options.resolved_endpoint()
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise ConfigError(f"Hub endpoint {endpoint!r} is not a URL ({err}); check HF_ENDPOINT",
                          endpoint=endpoint) from None
    if not host or parts.scheme not in ("http", "https"):
        raise ConfigError(f"Hub endpoint {endpoint!r} is not an http(s) URL; check HF_ENDPOINT",
                          endpoint=endpoint)
    timeout = min(options.timeout, PROBE_TIMEOUT_S)
    pool = ThreadPoolExecutor(max_workers=1)  # getaddrinfo has no timeout of its own
    try:
        pool.submit(socket.getaddrinfo, host, port).result(timeout=timeout)
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        raise HubUnreachableError(f"cannot reach {endpoint}: host {host!r} does not resolve (no "
                                  "network, or a wrong HF_ENDPOINT)", endpoint=endpoint) from None
    except (FutureTimeout, TimeoutError):
        raise HubUnreachableError(f"cannot reach {endpoint}: no answer within {timeout:g}s (no "
                                  "network, or a firewall)", endpoint=endpoint) from None
    except OSError as err:
        raise HubUnreachableError(f"cannot reach {endpoint}: {err.strerror or err} (is the endpoint "
                                  "up, and HF_ENDPOINT right?)", endpoint=endpoint) from None
    finally:
        pool.shutdown(wait=False)


def _single_retry_loop() -> None:
    """huggingface_hub's listing pages go through its own http_backoff (5 retries, up to 8 s
    apart) and it has no setting for that; inside with_retries that made nested loops (~150 s
    without a network). Make its pagination try once, so with_retries is the only loop."""
    from huggingface_hub.utils import _pagination

    if getattr(_pagination.http_backoff, "_zoospectra_single_try", False):
        return
    inner = _pagination.http_backoff

    def single_try(*args, **kwargs):
        kwargs["max_retries"] = 0
        return inner(*args, **kwargs)

    single_try._zoospectra_single_try = True  # type: ignore[attr-defined]
    _pagination.http_backoff = single_try


def _where(ctx: dict) -> str:
    return "/".join(str(ctx[k]) for k in ("repo", "revision", "file") if ctx.get(k))


# --- one repo at one revision ------------------------------------------------------------
class HubFileSource:
    """A Hub repo at a pinned revision, as a FileSource (pipeline/io/checkpoint.py).

    Listing and sizes come from one model-info call. `read_range` serves from the local HF
    cache when the file is there, downloads small files (configs, adapter weights) into the
    cache, and reads everything else with HTTP Range requests: only the bytes asked for.
    """

    def __init__(self, repo_id: str, revision: str, options: HubOptions | None = None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.options = options or HubOptions()
        self.name = f"{repo_id}@{revision}"
        self.bytes_fetched = 0                    # body bytes of ranged reads (metrics, tests)
        self._sizes: dict[str, int | None] | None = None

    def __getstate__(self) -> dict:  # ship only the identity to Ray workers, not counters
        state = dict(self.__dict__)
        state["bytes_fetched"] = 0
        return state

    def _ctx(self, filename: str | None = None) -> dict:
        return {"repo": self.repo_id, "revision": self.revision, "file": filename}

    # -- FileSource --
    def files(self) -> dict[str, int | None]:
        """filename -> size in bytes at this revision; None where the listing gives no size
        (Hub-compatible servers may omit it: `size()` then asks the server)."""
        if self._sizes is None:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=self.options.resolved_endpoint(), token=self.options.token)
            info = with_retries(
                lambda: api.model_info(self.repo_id, revision=self.revision, files_metadata=True,
                                       timeout=self.options.timeout),
                "model info", self.options, **self._ctx())
            self._sizes = {s.rfilename: _listed_size(s) for s in info.siblings or []}
        return self._sizes

    def exists(self, filename: str) -> bool:
        # A pinned snapshot never changes: a file in the cache exists at this revision, and
        # answering from it saves one API call per repo per worker on incremental crawls.
        if self._sizes is None and self.cached_path(filename) is not None:
            return True
        return filename in self.files()

    def size(self, filename: str) -> int:
        if self._sizes is None:
            path = self.cached_path(filename)
            if path is not None:
                return os.path.getsize(path)
        sizes = self.files()
        if filename not in sizes:
            raise HubNotFoundError(f"{filename!r} is not in {self.name}; check the file name",
                                   **self._ctx(filename))
        size = sizes[filename]
        if size is None:  # not listed: ask (one HEAD), never assume 0 (that read as "corrupt")
            size = self._head_size(filename)
            sizes[filename] = size
        return size

    def _head_size(self, filename: str) -> int:
        meta = with_retries(lambda: self._head(filename), "file size", self.options, **self._ctx(filename))
        size = getattr(meta, "size", None)
        if not isinstance(size, int) or size < 0:
            raise HubError("the server reports no size for this file (neither in the listing nor in "
                           "a HEAD reply); it cannot be read by byte ranges", **self._ctx(filename))
        return size

    def read_text(self, filename: str) -> str:
        with open(self.local_path(filename), encoding="utf-8") as f:
            return f.read()

    def read_range(self, filename: str, start: int, end: int) -> bytearray:
        """Bytes [start, end) of `filename`."""
        if not 0 <= start <= end:
            raise ValueError(f"bad byte range [{start}, {end}) for {self.name}/{filename}")
        if start == end:
            return bytearray()
        path = self.cached_path(filename)
        if path is None and _fetch_whole(filename):
            path = self.local_path(filename)
        if path is not None:
            return _read_local(path, start, end)
        return with_retries(lambda: self._get_range(filename, start, end), "ranged read",
                            self.options, **self._ctx(filename))

    # -- cache and downloads --
    def cached_path(self, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.options.resolved_cache_dir(),
                                     revision=self.revision)
        return hit if isinstance(hit, str) else None

    def local_path(self, filename: str) -> str:
        """The file in the HF cache, downloaded at this revision if it is not there yet."""
        path = self.cached_path(filename)
        if path is not None:
            return path
        return with_retries(lambda: self._download(filename), "download", self.options,
                            **self._ctx(filename))

    def check_access(self, filename: str) -> None:
        """One HEAD request: raises HubAccessError / HubNotFoundError if the file can't be read."""
        with_retries(lambda: self._head(filename), "access check", self.options, **self._ctx(filename))

    # -- HTTP --
    def _url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.revision,
                          endpoint=self.options.resolved_endpoint())

    def _head(self, filename: str) -> object:
        from huggingface_hub import get_hf_file_metadata

        return get_hf_file_metadata(self._url(filename), token=self.options.token,
                                    timeout=self.options.timeout,
                                    endpoint=self.options.resolved_endpoint())

    def _download(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        # Our own HEAD first: its failures get our bounded retries, whereas hf_hub_download
        # would retry them itself with second-scale sleeps we cannot configure.
        self._head(filename)
        return hf_hub_download(self.repo_id, filename, revision=self.revision,
                               cache_dir=self.options.resolved_cache_dir(),
                               endpoint=self.options.resolved_endpoint(), token=self.options.token,
                               etag_timeout=self.options.timeout)

    def _get_range(self, filename: str, start: int, end: int) -> bytearray:
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        headers = build_hf_headers(token=self.options.token)
        headers.update({"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        # LFS files redirect to a CDN on another origin; httpx drops Authorization there.
        with get_session().stream("GET", self._url(filename), headers=headers,
                                  timeout=self.options.timeout, follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            data = _range_body(response, start, end, f"{self.name}/{filename}")
        self.bytes_fetched += len(data)
        return data


def _listed_size(sibling: object) -> int | None:
    """A sibling's size from the listing: the LFS size for LFS files, else `size`; None if absent."""
    lfs = getattr(sibling, "lfs", None)
    for size in (getattr(lfs, "size", None) if lfs is not None else None, getattr(sibling, "size", None)):
        if isinstance(size, int) and size >= 0:
            return size
    return None


def _fetch_whole(filename: str) -> bool:
    base = filename.rsplit("/", 1)[-1]
    return base in WHOLE_FILES or base.endswith(WHOLE_SUFFIXES)


def _read_local(path: str, start: int, end: int) -> bytearray:
    buf = bytearray(end - start)
    with open(path, "rb") as f:
        f.seek(start)
        n = f.readinto(buf)
    if n != len(buf):
        raise CheckpointNotFoundError(f"cached file ended at byte {start + n}, expected {end}: "
                                      "the cache entry is truncated; delete it and rerun", file=path)
    return buf


def _range_body(response: httpx2.Response, start: int, end: int, where: str) -> bytearray:
    """The body of a ranged GET. A server that ignores Range (200) is streamed up to `end` only."""
    want = end - start
    if response.status_code == 206:
        expected = f"bytes {start}-{end - 1}/"
        if not response.headers.get("Content-Range", "").startswith(expected):
            raise HubError(f"server answered Content-Range {response.headers.get('Content-Range')!r} "
                           f"for bytes {start}-{end - 1}; the endpoint mishandles ranges", file=where)
        data = bytearray(response.read())
    else:  # 200: skip to `start`, stop at `end`
        data, pos = bytearray(), 0
        for chunk in response.iter_bytes():
            lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
            if lo < hi:
                data += chunk[lo:hi]
            pos += len(chunk)
            if pos >= end:
                break
    if len(data) != want:
        raise HubUnavailableError(f"got {len(data)} bytes for range [{start}, {end}), expected {want}; "
                                  "the connection was cut: retry", file=where)
    return data


def check_repo_id(repo_id: object) -> str:
    """A repo id the Hub client accepts ('org/name'), else a HubError naming it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        # annotated str, but it refuses anything else with HFValidationError: what we want here
        validate_repo_id(repo_id)  # type: ignore[arg-type]
    except HFValidationError as e:
        raise HubError(f"not a valid Hub repo id: {e}", repo=str(repo_id)) from None
    return str(repo_id)


def pin(repo_id: str, revision: str = "main", options: HubOptions | None = None) -> str:
    """The commit sha that `revision` (branch, tag or sha) of `repo_id` points to now."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    opts = options or HubOptions()
    api = HfApi(endpoint=opts.resolved_endpoint(), token=opts.token)
    info = with_retries(lambda: api.model_info(repo_id, revision=revision, expand=["sha"],
                                               timeout=opts.timeout),
                        "pin revision", opts, repo=repo_id, revision=revision)
    if not info.sha:
        raise HubError("the Hub gave no commit sha for this revision; cannot pin it", repo=repo_id,
                       revision=revision)
    return info.sha


# --- references as written ----------------------------------------------------------------
HF_PREFIX = "hf://"
# org/name with an optional @revision (a branch, tag or sha; branches may hold '/')
_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<rev>[^\s@]+))?$")
PATH_START = ("/", ".", "~")


@dataclass(frozen=True)
class HubSpec:
    """A Hub reference as written: repo id and revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def hub_spec(text: str) -> HubSpec | None:
    """The Hub reference `text` spells, or None when it reads as a local path."""
    body = text[len(HF_PREFIX):] if text.startswith(HF_PREFIX) else text
    if not text.startswith(HF_PREFIX) and (text.startswith(PATH_START) or os.path.exists(text)):
        return None
    match = _HUB_REF.match(body)
    if match is None:
        if text.startswith(HF_PREFIX):  # said hf:// but is no repo id: say so, not "no such dir"
            raise ConfigError(f"{text!r} is not a Hub reference: write hf://org/name or "
                              "hf://org/name@revision", ref=text)
        return None
    return HubSpec(match["repo"], match["rev"])


# --- discovery ---------------------------------------------------------------------------
Kind = Literal["adapter", "full"]


@dataclass(frozen=True, order=True)
class CatalogEntry:
    """A discovered repo, pinned to the commit it was at when listed."""

    repo_id: str
    sha: str
    kind: Kind
    base_model: str
    last_modified: datetime | None = None
    gated: str | None = None                  # "auto" | "manual" | None (not gated)
    private: bool = False
    base_revision: str | None = None          # the revision the adapter config names (not stored)

    @property
    def key(self) -> tuple[str, str]:
        """What "already analysed" means: the same repo at the same commit."""
        return (self.repo_id, self.sha)

    def row(self, run_id: str, discovered_at: datetime | None = None) -> dict:
        """A row of the `catalog` table (schemas/tables.py)."""
        return {
            "repo_id": self.repo_id, "sha": self.sha, "kind": self.kind,
            "base_model": self.base_model, "last_modified": self.last_modified,
            "gated": self.gated, "private": self.private,
            "discovered_at": discovered_at or datetime.now(timezone.utc), "run_id": run_id,
        }


@dataclass
class Discovery:
    entries: list[CatalogEntry] = field(default_factory=list)   # new: (repo, sha) not analysed yet
    errors: list[dict] = field(default_factory=list)   # `errors` rows minus run_id / unit_id
    known: list[CatalogEntry] = field(default_factory=list)     # listed, already analysed: not fetched

    @property
    def n_listed(self) -> int:
        return len(self.entries) + len(self.known)


Known = Mapping[tuple[str, str], CatalogEntry]


def unanalysed(entries: Iterable[CatalogEntry], analysed: Iterable[tuple[str, str]]) -> list[CatalogEntry]:
    """Entries whose (repo, sha) is not in `analysed`: new repos and new commits only."""
    done = set(analysed)
    return [e for e in entries if e.key not in done]


def pinned_ref(repo_id: str, sha: str | None) -> Pinned | None:
    """repo@sha as the identity of an `errors` row; None when no sha is known."""
    return Pinned("hub", repo_id, sha) if sha else None


def discover(base_models: list[str], *, include_full: bool = False, limit: int | None = None,
             api: HfApi | None = None, options: HubOptions | None = None,
             on_progress: Callable[[int, int, str], None] | None = None,
             known: Known | None = None) -> Discovery:
    """Adapters (and, with include_full, full fine-tunes) of each base, pinned to their sha.

    `limit` caps the listing per base model and kind. Adapters must carry adapter_config.json
    naming this base and safetensors weights; full fine-tunes must carry safetensors weights
    that this token can read. Anything else becomes an `errors` row and discovery goes on.
    A listed (repo, sha) in `known` (already analysed) is taken as it is: no request for it.
    """
    from huggingface_hub import HfApi

    opts = options or HubOptions()
    if api is None:  # a given api is the caller's (a fake in tests): nothing to probe
        probe_endpoint(opts)
        _single_retry_loop()
    api = api or HfApi(endpoint=opts.resolved_endpoint(), token=opts.token)
    found, seen = Discovery(), set()
    for base in base_models:
        # the Hub's adapter tag alone: image-model LoRAs (kohya, LyCORIS, diffusers) carry it without "peft"
        kinds: list[tuple[Kind, list[str]]] = [("adapter", [f"base_model:adapter:{base}"])]
        if include_full:
            kinds.append(("full", [f"base_model:finetune:{base}"]))
        for kind, filters in kinds:
            try:
                listed = with_retries(_listing(api, filters, limit), "list models", opts, repo=base,
                                      filter=",".join(filters))
            except HubError as err:
                found.errors.append(error_row("hub", err, model_id=base))
                continue
            for i, info in enumerate(listed, 1):
                if on_progress:  # checking a repo is a request or two: minutes for thousands
                    on_progress(i, len(listed), f"{kind}s of {base}: {info.id}")
                if info.id in seen:
                    continue
                seen.add(info.id)
                if known and info.sha and (info.id, info.sha) in known:
                    found.known.append(known[(info.id, info.sha)])
                    continue
                try:
                    found.entries.append(_admit(info, kind, base, opts))
                except ZoospectraError as err:
                    found.errors.append(error_row("hub", err, model=pinned_ref(info.id, info.sha), model_id=info.id))
    found.entries.sort()
    return found


def _client(api: HfApi | None, opts: HubOptions) -> HfApi:
    """The caller's api (a fake in tests: nothing to probe), else a probed real one."""
    from huggingface_hub import HfApi

    if api is not None:
        return api
    probe_endpoint(opts)
    _single_retry_loop()
    return HfApi(endpoint=opts.resolved_endpoint(), token=opts.token)


def discover_sources(*, authors: Iterable[str] = (), searches: Iterable[str] = (),
                     repos: Iterable[str] = (), include_full: bool = False, limit: int | None = None,
                     api: HfApi | None = None, options: HubOptions | None = None,
                     on_progress: Callable[[int, int, str], None] | None = None,
                     known: Known | None = None) -> Discovery:
    """Adapters (and, with include_full, full fine-tunes) published by `authors`, matching
    `searches`, or listed in `repos` (references org/name[@revision]), pinned to their sha.

    Each entry's base_model is the base its adapter_config.json (or model card) names: these
    sources do not say which base they are of. A listed repo that is neither an adapter nor an
    included full fine-tune is skipped; one named in `repos` is an `errors` row instead.
    """
    opts = options or HubOptions()
    api = _client(api, opts)
    found, seen = Discovery(), set()
    listings: list[tuple[str, Callable[[], list[ModelInfo]], bool]] = []
    for org in authors:
        listings.append((f"author:{org}", _listing(api, [], limit, author=org), False))
    for text in searches:
        listings.append((f"search:{text}", _listing(api, [], limit, search=text), False))
    for ref in list(repos)[:limit]:
        spec = hub_spec(ref)
        if spec is None:
            found.errors.append(error_row("hub", HubError("not a Hub reference (org/name[@revision])",
                                                          repo=ref), model_id=ref))
            continue
        listings.append((ref, _info_call(api, spec.repo_id, spec.revision, opts), True))
    for label, call, named in listings:
        try:
            listed = with_retries(call, "list models", opts, repo=label)
        except HubError as err:
            found.errors.append(error_row("hub", err, model_id=label))
            continue
        for i, info in enumerate(listed, 1):
            if on_progress:
                on_progress(i, len(listed), f"{label}: {info.id}")
            if (info.id, info.sha) in seen:
                continue
            seen.add((info.id, info.sha))
            if known and info.sha and (info.id, info.sha) in known:
                found.known.append(known[(info.id, info.sha)])
                continue
            try:
                entry = _admit_any(info, include_full, opts)
            except ZoospectraError as err:
                found.errors.append(error_row("hub", err, model=pinned_ref(info.id, info.sha), model_id=info.id))
                continue
            if entry is not None:
                found.entries.append(entry)
            elif named:
                found.errors.append(error_row("hub", CheckpointNotFoundError(
                    "neither a PEFT adapter (no adapter_config.json) nor, without --include full, "
                    "an analysed full fine-tune; skipped", repo=info.id, revision=info.sha),
                    model=pinned_ref(info.id, info.sha), model_id=info.id))
    found.entries.sort()
    return found


def _info_call(api: HfApi, repo_id: str, revision: str | None, opts: HubOptions
               ) -> Callable[[], list[ModelInfo]]:
    """One model-info call, shaped like a listing of one repo (pinned to `revision`'s sha)."""
    return lambda: [api.model_info(check_repo_id(repo_id), revision=revision, expand=LIST_EXPAND,
                                   timeout=opts.timeout)]


def _admit_any(info: ModelInfo, include_full: bool, opts: HubOptions) -> CatalogEntry | None:
    """An adapter or (with include_full) a full fine-tune with the base it names; None if the
    repo is neither."""
    check_repo_id(info.id)
    if not info.sha:
        raise HubError("the listing gave no commit sha; cannot pin this repo", repo=info.id)
    names = {s.rfilename for s in info.siblings or []}
    source = HubFileSource(info.id, info.sha, opts)
    card = _card_base(info)
    base: str | None
    revision: str | None
    if "adapter_config.json" in names:
        kind: Kind = "adapter"
        config = _adapter_config(source, names)
        named, rev = config.get("base_model_name_or_path"), config.get("revision")
        if isinstance(named, str) and named.strip():  # the revision goes with the config's base
            base, revision = named.strip(), (rev if isinstance(rev, str) and rev else None)
        else:
            base, revision = card, None
    elif _is_image_lora(info, names):  # kohya / LyCORIS / diffusers file: the card names the base
        kind, base, revision = "adapter", card, None
        _image_lora_file(source, names)
    elif include_full and any(n.endswith(".safetensors") for n in names):
        kind, base, revision = "full", card, None
        source.check_access(_full_weights(source, names))
    else:
        return None
    if not base:
        from ..errors import BaseUnresolvedError

        raise BaseUnresolvedError("names no base (no base_model_name_or_path in adapter_config.json, "
                                  "no base_model in its model card); analyse it with `zoospectra "
                                  "analyze REPO --base REF`", repo=info.id, revision=info.sha)
    gated = info.gated if isinstance(info.gated, str) else None
    return CatalogEntry(info.id, info.sha, kind, base, info.last_modified, gated, bool(info.private),
                        revision)


def _card_base(info: ModelInfo) -> str | None:
    """base_model of the model card as the listing gives it (cardData), when it names one."""
    card = getattr(info, "card_data", None)
    named = card.get("base_model") if card is not None else None
    if isinstance(named, list) and len(named) == 1:
        named = named[0]
    return named.strip() if isinstance(named, str) and named.strip() else None


def _listing(api: HfApi, filters: list[str], limit: int | None, *, author: str | None = None,
             search: str | None = None) -> Callable[[], list[ModelInfo]]:
    """One listing call for with_retries, bound to these filters (not to the loop's variable),
    optionally of one author's repos or of a search."""
    return lambda: list(api.list_models(filter=filters or None, author=author, search=search,
                                        expand=LIST_EXPAND, limit=limit))


def _admit(info: ModelInfo, kind: Kind, base: str, opts: HubOptions) -> CatalogEntry:
    """Check one listed repo and pin it; raise a ZoospectraError saying why it can't be used."""
    check_repo_id(info.id)
    if not info.sha:
        raise HubError("the listing gave no commit sha; cannot pin this repo", repo=info.id)
    names = {s.rfilename for s in info.siblings or []}
    source = HubFileSource(info.id, info.sha, opts)
    if kind == "adapter" and "adapter_config.json" not in names and _is_image_lora(info, names):
        _check_image_lora(source, names, base, _card_base(info))
    elif kind == "adapter":
        _check_adapter(source, names, base)
    else:
        source.check_access(_full_weights(source, names))
    gated = info.gated if isinstance(info.gated, str) else None
    return CatalogEntry(info.id, info.sha, kind, base, info.last_modified, gated, bool(info.private))


def _check_adapter(source: HubFileSource, names: set[str], base: str) -> None:
    ctx = {"repo": source.repo_id, "revision": source.revision}
    config = _adapter_config(source, names)
    named = str(config.get("base_model_name_or_path") or "")
    if _norm_id(named) != _norm_id(base):
        raise BaseMismatchError(
            f"adapter_config.json names base {named!r}, but the repo is listed as an adapter of "
            f"{base!r}; it is skipped: crawl {named!r} to analyse it", base=base, **ctx)


LORA_FILE = "pytorch_lora_weights.safetensors"   # diffusers' name (adapters/image_lora.py)


def _is_image_lora(info: ModelInfo, names: set[str]) -> bool:
    """An image-model LoRA repo without adapter_config.json: diffusers' LoRA file, or a "lora"-tagged
    repo whose weights are root .safetensors files and that is no full model or pipeline."""
    if "adapter_config.json" in names:
        return False
    if LORA_FILE in names:
        return True
    full = {"model.safetensors", "model.safetensors.index.json", "model_index.json"}
    return "lora" in (info.tags or []) and not (full & names) and any(
        n.endswith(".safetensors") and "/" not in n for n in names)


def _image_lora_file(source: HubFileSource, names: set[str]) -> str:
    """The LoRA file of an image-model adapter repo (the one ImageLora will open)."""
    ctx = {"repo": source.repo_id, "revision": source.revision}
    if LORA_FILE in names:
        return LORA_FILE
    files = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if len(files) == 1:
        return files[0]
    if files:
        raise CheckpointNotFoundError(f"several .safetensors files {files[:5]} and no adapter_config.json: "
                                      "cannot tell which is the LoRA; skipped", **ctx)
    raise CheckpointNotFoundError("no adapter_config.json and no LoRA safetensors file; skipped", **ctx)


def _check_image_lora(source: HubFileSource, names: set[str], base: str, card: str | None) -> None:
    """A single-file LoRA has no adapter config: its model card's base_model must be the listed base."""
    _image_lora_file(source, names)
    if card is not None and _norm_id(card) != _norm_id(base):
        raise BaseMismatchError(
            f"the model card names base {card!r}, but the repo is listed as an adapter of {base!r}; "
            f"it is skipped: crawl {card!r} to analyse it", base=base, repo=source.repo_id, revision=source.revision)


def _adapter_config(source: HubFileSource, names: set[str]) -> dict:
    """adapter_config.json of a PEFT adapter repo with safetensors weights (downloaded into the
    HF cache), else a typed error saying what is missing."""
    ctx = {"repo": source.repo_id, "revision": source.revision}
    if "adapter_config.json" not in names:
        raise CheckpointNotFoundError("no adapter_config.json: not a PEFT adapter repo", **ctx)
    if "adapter_model.safetensors" not in names:
        if "adapter_model.bin" in names:
            raise UnsafeCheckpointError("only adapter_model.bin (a pickle) is published: zoospectra "
                                        "never unpickles untrusted files", **ctx)
        raise CheckpointNotFoundError("no adapter_model.safetensors in the adapter repo", **ctx)
    try:
        config = json.loads(source.read_text("adapter_config.json"))
    except json.JSONDecodeError as e:
        raise BaseMismatchError(f"adapter_config.json is not valid JSON ({e})", **ctx) from None
    if not isinstance(config, dict):
        raise BaseMismatchError("adapter_config.json is not a JSON object", **ctx)
    return config


def weights_file(source: HubFileSource) -> str:
    """The file that holds (or indexes) a full checkpoint's safetensors weights at this revision."""
    return _full_weights(source, set(source.files()))


def _full_weights(source: HubFileSource, names: set[str]) -> str:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if name in names:
            return name
    if "model_index.json" in names:  # a diffusers pipeline: its first adapter-targetable component's weights
        from .components import COMPONENT_WEIGHTS, COMPONENTS

        found = [f"{c}/{w}" for c in COMPONENTS for w in COMPONENT_WEIGHTS if f"{c}/{w}" in names]
        if found:
            return found[0]
    shards = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if shards:
        return shards[0]
    ctx = {"repo": source.repo_id, "revision": source.revision}
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        raise UnsafeCheckpointError("only pickle weights are published: zoospectra never unpickles "
                                    "untrusted files; skipped", **ctx)
    raise CheckpointNotFoundError("no safetensors weights in this fine-tune; skipped", **ctx)


def _norm_id(repo_id: str) -> str:
    return repo_id.strip().rstrip("/").lower()
