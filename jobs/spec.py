"""Crawl job specs: one YAML file per scheduled crawl, validated once, here, at the edge.

    name: nightly-llama
    base_models: [meta-llama/Llama-3.1-8B]    # org/name or org/name@revision
    author: [some-org]        # optional: every adapter these orgs publish (base from its config)
    search: [llama-lora]      # optional: every adapter whose id matches
    repos: repos.txt          # optional: a file of references (one a line, '#' comments) or a list
    include_full: false
    limit: 500                # per base model and kind (adapters / full fine-tunes)
    out: s3://bucket/zoospectra
    schedule: "0 3 * * *"     # documentation for deploy/ (the CronJob carries the real one)
    ray_address: auto         # optional; omitted = a local Ray
    analysis: {k: 10, eps: 0.5, k_store: 32, mode: fast, dtype: float32}
    hub: {timeout: 30, max_retries: 4, backoff: 1, retry_after_max: 120}   # optional
    base_cache: s3://bucket/zoospectra-bases   # optional; base SVDs shared across roots (default OUT/bases)

`hub` tunes the Hub client (zoospectra.io.hub.HubOptions) for discovery, planning and the Ray
workers alike; it has no token field on purpose (HF_TOKEN / `hf auth login` supply it).
Unknown keys are errors: a typo must not silently fall back to a default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from zoospectra.config import ALL, AnalysisConfig
from zoospectra.errors import ConfigError
from zoospectra.io.hub import HubOptions

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")       # a Kubernetes resource name
_HUB_NUMBERS = ("timeout", "backoff", "backoff_max", "retry_after_max")
_HUB_KEYS = (*_HUB_NUMBERS, "max_retries", "endpoint", "cache_dir")
_ANALYSIS_KEYS = tuple(f.name for f in fields(AnalysisConfig))  # defaults: AnalysisConfig itself


@dataclass(frozen=True)
class CrawlSpec:
    name: str
    out: str
    base_models: tuple[str, ...] = ()
    author: tuple[str, ...] = ()      # Hub organisations / users
    search: tuple[str, ...] = ()      # Hub search terms
    repos: tuple[str, ...] = ()       # Hub references org/name[@revision]
    include_full: bool = False
    limit: int | None = None
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    batch_size: int = 32
    ray_address: str | None = None
    schedule: str | None = None
    hub: HubOptions = field(default_factory=HubOptions)
    base_cache: str | None = None   # where base SVDs are stored and reused (default OUT/bases)
    # compact (run/compact.py) once loose unit folders hold this many files; 0 or None: never
    compact_after_files: int | None = 2000

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or len(self.name) > 52:
            raise ConfigError(f"name {self.name!r} must be a lowercase DNS label (a-z, 0-9, '-'), "
                              "at most 52 characters: it names the Kubernetes resources", option="name")
        if not (self.base_models or self.author or self.search or self.repos):
            raise ConfigError("base_models is empty and no author, search or repos is given: list at "
                              "least one Hub repo id or another source", option="base_models")
        for repo in (*self.base_models, *self.repos):
            if not _hub_ref_valid(repo):
                raise ConfigError(f"{repo!r} is not a Hub repo id like 'org/name' (or 'org/name@revision')",
                                  option="repos" if repo in self.repos else "base_models")
        for key in ("author", "search"):
            for value in getattr(self, key):
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"{key} entries must be non-empty strings, got {value!r}", option=key)
            if key == "author" and not all(_REPO_ID.match(a) and "/" not in a for a in self.author):
                raise ConfigError(f"author must list Hub user or organisation names, got {list(self.author)}",
                                  option="author")
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError("out must be a results root (local path or filesystem URI)", option="out")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            raise ConfigError(f"limit must be a positive integer, got {self.limit!r}", option="limit")
        if self.base_cache is not None and (not isinstance(self.base_cache, str) or not self.base_cache):
            raise ConfigError("base_cache must be a path or filesystem URI", option="base_cache")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}",
                              option="batch_size")
        if self.compact_after_files is not None and (not _is_int(self.compact_after_files)
                                                     or self.compact_after_files < 0):
            raise ConfigError(f"compact_after_files must be an integer >= 0 (0: never compact), got "
                              f"{self.compact_after_files!r}", option="compact_after_files")
        if not isinstance(self.include_full, bool):
            raise ConfigError(f"include_full must be true or false, got {self.include_full!r}",
                              option="include_full")
        if self.schedule is not None:
            validate_cron(self.schedule)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "job spec") -> CrawlSpec:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(raw).__name__}", file=where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}", file=where)
        missing = sorted({"name", "out"} - set(raw))
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {missing}", file=where)
        data = dict(raw)
        for key in ("base_models", "author", "search"):
            value = data.get(key)
            data[key] = tuple([value] if isinstance(value, str) else value or ())
        repos = data.get("repos")
        # a string is a file of references (relative to the spec's folder); a list, the references
        data["repos"] = read_repos(_near(repos, where)) if isinstance(repos, str) else tuple(repos or ())
        data["analysis"] = _analysis(data.get("analysis") or {}, where)
        data["hub"] = _hub(data.get("hub") or {}, where)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> CrawlSpec:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"job spec {p} does not exist; pass the path of a YAML spec", file=str(p))
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"job spec {p} is not valid YAML: {e}", file=str(p)) from None
        return cls.from_dict(raw, str(p))


def read_repos(path: str | Path) -> tuple[str, ...]:
    """References from a file, one a line; '#' starts a comment, blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"repos file {p} does not exist; pass a file with one Hub reference a line",
                          file=str(p))
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"repos file {p} cannot be read as text ({e})", file=str(p)) from None
    refs = tuple(line.split("#", 1)[0].strip() for line in lines)
    return tuple(r for r in refs if r)


def _near(path: str, where: str) -> Path:
    """`path` as written, or relative to the spec file's folder when that is where it exists."""
    p = Path(path)
    if p.is_absolute() or p.exists() or where == "job spec":
        return p
    return Path(where).parent / p


def _hub_ref_valid(ref: object) -> bool:
    """org/name, org/name@revision or hf://org/name[@revision], with an id the Hub accepts."""
    if not isinstance(ref, str):
        return False
    body = ref[len("hf://"):] if ref.startswith("hf://") else ref
    repo, _, rev = body.partition("@")
    return bool(_REPO_ID.match(repo)) and _hub_valid(repo) and (not _ or bool(rev.strip()))


def _hub_valid(repo: str) -> bool:
    """What huggingface_hub itself accepts ('..', '--', over 96 characters are refused)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _analysis(raw: Any, where: str) -> AnalysisConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: analysis must be a mapping", file=where, option="analysis")
    unknown = sorted(set(raw) - set(_ANALYSIS_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown analysis option(s) {unknown}; known: {list(_ANALYSIS_KEYS)}",
                          file=where, option="analysis")
    # values as the YAML gave them: AnalysisConfig.__post_init__ checks each (ConfigError)
    opts: dict[str, Any] = {k: (ALL if isinstance(v, str) and v.lower() == "all" else v) for k, v in raw.items()}
    return AnalysisConfig(**opts)


def _hub(raw: Any, where: str) -> HubOptions:
    if isinstance(raw, HubOptions):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: hub must be a mapping", file=where, option="hub")
    unknown = sorted(set(raw) - set(_HUB_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown hub option(s) {unknown}; known: {list(_HUB_KEYS)} "
                          "(tokens come from HF_TOKEN or `hf auth login`, never from a spec)",
                          file=where, option="hub")
    for key in _HUB_NUMBERS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0):
            raise ConfigError(f"{where}: hub.{key} must be a positive number of seconds, got {value!r}",
                              file=where, option=f"hub.{key}")
    retries = raw.get("max_retries")
    if retries is not None and (not _is_int(retries) or retries < 0):
        raise ConfigError(f"{where}: hub.max_retries must be an integer >= 0, got {retries!r}",
                          file=where, option="hub.max_retries")
    for key in ("endpoint", "cache_dir"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key]):
            raise ConfigError(f"{where}: hub.{key} must be a non-empty string", file=where,
                              option=f"hub.{key}")
    if raw.get("endpoint") and not str(raw["endpoint"]).startswith(("http://", "https://")):
        raise ConfigError(f"{where}: hub.endpoint must be an http(s) URL, got {raw['endpoint']!r}",
                          file=where, option="hub.endpoint")
    checked: dict[str, Any] = {k: (float(v) if k in _HUB_NUMBERS else v) for k, v in raw.items()}
    return HubOptions(**checked)


# --- cron --------------------------------------------------------------------------------
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_CRON_NAMES = {
    3: {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    4: {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
}
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def validate_cron(expr: str) -> str:
    """Check a standard 5-field cron expression (the syntax Kubernetes CronJobs accept)."""
    if not isinstance(expr, str):
        raise ConfigError(f"schedule must be a cron string, got {expr!r}", option="schedule")
    text = expr.strip()
    if text.lower() in _CRON_MACROS:
        return text
    parts = text.split()
    if len(parts) != 5:
        raise ConfigError(f"schedule {expr!r} must have 5 fields (minute hour day month weekday)",
                          option="schedule")
    for i, (part, (what, lo, hi)) in enumerate(zip(parts, _CRON_FIELDS, strict=True)):
        for item in part.split(","):
            if not _cron_item_ok(item.lower(), lo, hi, _CRON_NAMES.get(i, {})):
                raise ConfigError(f"schedule {expr!r}: bad {what} field {part!r} (allowed {lo}-{hi})",
                                  option="schedule")
    return text


def _cron_item_ok(item: str, lo: int, hi: int, names: dict[str, int]) -> bool:
    body, _, step = item.partition("/")
    if step and not (step.isdigit() and int(step) >= 1):
        return False
    if body in ("*", "?"):
        return True
    first, _, last = body.partition("-")
    found = [names.get(v, int(v) if v.isdigit() else None) for v in ([first, last] if last else [first])]
    values = [v for v in found if v is not None]
    if len(values) != len(found):  # a word that is no name and no number
        return False
    return all(lo <= v <= hi for v in values) and values[0] <= values[-1]
