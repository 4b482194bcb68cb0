"""What a user or a config names, turned into pinned ModelRefs.

    resolve_ref("org/lora@main")            # Hub repo pinned to the sha `main` points to now
    resolve_ref("hf://org/lora@3f2a...")     # the same, spelled as a URI
    resolve_ref("path/to/adapter", "mine")   # a local directory, recorded as "mine"
    base = BaseResolver(options)(adapter)    # the base the adapter's config / model card names

An artifact argument is a local directory when one exists at that path (or it starts with
'/', '.', '~'); otherwise `org/name[@revision]` or `hf://...` is a Hub reference. A Hub
reference is pinned here, when the plan is made: every row then carries the commit sha.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BaseUnresolvedError, HubError, ZoospectraError
from .hub import PATH_START, HubSpec, hub_spec
from .refs import ModelRef, hub_ref, local_ref

if TYPE_CHECKING:
    from .hub import HubOptions

__all__ = ["BaseClaim", "BaseResolver", "HubSpec", "claimed_base", "hub_spec", "resolve_ref"]


def resolve_ref(text: str, name: str | None = None, options: HubOptions | None = None) -> ModelRef:
    """A local directory (pinned by content) or a Hub reference (pinned to its commit sha)."""
    spec = hub_spec(text)
    if spec is None:
        return local_ref(text, name)
    return pin_hub(spec, name, options, what=text)


_PROBED: set[str] = set()


def pin_hub(spec: HubSpec, name: str | None, options: HubOptions | None, what: str) -> ModelRef:
    from .hub import HubOptions, pin, probe_endpoint

    opts = options or HubOptions()
    try:
        # One bounded connect per endpoint first: without a network a mistyped path would
        # otherwise spend minutes in retries before saying so.
        if opts.resolved_endpoint() not in _PROBED:
            probe_endpoint(opts)
            _PROBED.add(opts.resolved_endpoint())
        sha = pin(spec.repo_id, spec.revision or "main", opts)
    except HubError as err:  # a mistyped local path reads as a repo id too: name both readings
        raise type(err)(f"{what!r} is not a local directory, and as a Hub reference: {err.message}",
                        **err.context) from None
    return hub_ref(spec.repo_id, sha, opts, name=name)


# --- which base an artifact names ----------------------------------------------------------
@dataclass(frozen=True)
class BaseClaim:
    """The base an artifact says it was trained on, and where it says so."""

    name: str                  # base_model_name_or_path / base_model: a Hub id or a path
    revision: str | None
    where: str                 # "adapter_config.json" or "README.md (model card)"


def claimed_base(ref: ModelRef) -> BaseClaim | None:
    """adapter_config.json's base_model_name_or_path (+ revision), else the model card's
    base_model; None when neither names one."""
    source = ref.open_source()
    if source.exists("adapter_config.json"):
        config = _json(source.read_text("adapter_config.json"), ref, "adapter_config.json")
        named = config.get("base_model_name_or_path")
        if isinstance(named, str) and named.strip():
            rev = config.get("revision")
            return BaseClaim(named.strip(), rev if isinstance(rev, str) and rev else None,
                             "adapter_config.json")
    if source.exists("README.md"):
        named = _card_base(source.read_text("README.md"), ref)
        if named:
            return BaseClaim(named, None, "README.md (model card)")
    return None


def _json(text: str, ref: ModelRef, filename: str) -> dict:
    from ..errors import AdapterConfigError

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterConfigError(f"{filename} is not valid JSON ({e}); fix it or pass --base",
                                 file=f"{ref.location}/{filename}") from None
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{filename} is not a JSON object; fix it or pass --base",
                                 file=f"{ref.location}/{filename}")
    return data


def _card_base(readme: str, ref: ModelRef) -> str | None:
    """base_model from a model card's YAML front matter (a string, or a one-element list)."""
    import yaml

    if not readme.startswith("---"):
        return None
    head, sep, _ = readme[3:].partition("\n---")
    if not sep:
        return None
    try:
        card = yaml.safe_load(head)
    except yaml.YAMLError:
        return None  # a broken card names nothing; the caller says to pass --base
    named = card.get("base_model") if isinstance(card, dict) else None
    if isinstance(named, list):
        if len(named) > 1:  # a merge names several: which one the deltas are against is a choice
            raise BaseUnresolvedError(f"the model card names {len(named)} base models {named}; "
                                      "pass --base REF to choose one", model=ref.model_id)
        named = named[0] if named else None
    return named.strip() if isinstance(named, str) and named.strip() else None


class BaseResolver:
    """Each artifact's base as a pinned ModelRef. A base named by many artifacts is pinned (or
    hashed) once; a failure is remembered too, so an unreachable base costs one try per run."""

    def __init__(self, options: HubOptions | None = None) -> None:
        self.options = options
        self._memo: dict[tuple[str, str | None, str], ModelRef | ZoospectraError] = {}

    def __call__(self, ref: ModelRef) -> ModelRef:
        claim = claimed_base(ref)
        if claim is None:
            raise BaseUnresolvedError(
                "no base named: adapter_config.json has no base_model_name_or_path and the model "
                "card no base_model; pass --base REF (a directory or org/name[@revision])",
                model=ref.model_id)
        # A relative path in a local adapter's config may be relative to the adapter itself.
        return self.resolve(claim, ref.location if ref.source == "local" else "")

    def resolve(self, claim: BaseClaim, near: str = "") -> ModelRef:
        """The pinned base `claim` names (`near`: the folder a relative path may be relative to)."""
        key = (claim.name, claim.revision, near)
        if key not in self._memo:
            try:
                self._memo[key] = self._resolve(claim, near)
            except ZoospectraError as err:
                self._memo[key] = err
        found = self._memo[key]
        if isinstance(found, ZoospectraError):
            raise found
        return found

    def _resolve(self, claim: BaseClaim, near: str) -> ModelRef:
        ctx = {"base": claim.name, "named_in": claim.where}
        path = os.path.expanduser(claim.name)
        for candidate in (path, os.path.join(near, path) if near and not os.path.isabs(path) else None):
            if candidate and os.path.isdir(candidate):
                return local_ref(candidate)
        spec = None if claim.name.startswith(PATH_START) else hub_spec(claim.name)
        if spec is None:
            raise BaseUnresolvedError(f"{claim.where} names base {claim.name!r}: no such directory here "
                                      "and not a Hub repo id; pass --base REF", **ctx)
        if claim.revision and not spec.revision:
            spec = HubSpec(spec.repo_id, claim.revision)
        try:
            return pin_hub(spec, None, self.options, what=claim.name)
        except HubError as err:
            raise type(err)(f"base {spec} named in {claim.where} cannot be read: {err.message}; "
                            "pass --base REF to analyse against another copy", **err.context) from None
