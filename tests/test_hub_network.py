"""No network, and one retry loop: the real huggingface_hub client against the loopback Hub,
a closed loopback port and an unresolvable host."""
from __future__ import annotations

import time

import pytest
from hub_server import LISTING, FakeHub

from zoospectra.errors import HubUnreachableError
from zoospectra.io.hub import HubOptions, discover


def test_a_failing_listing_is_retried_by_one_loop_only(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    fake_hub.inject(LISTING, status=503, times=1000)
    t0 = time.perf_counter()
    found = discover(["org/base"], options=hub_options)
    elapsed = time.perf_counter() - t0
    # our loop: 1 try + max_retries; huggingface_hub's own http_backoff would multiply it by 6
    # and sleep 1 + 2 + 4 + 8 + 8 s per round
    assert len(fake_hub.requests(LISTING)) == hub_options.max_retries + 1
    assert elapsed < 10, elapsed
    assert len(found.errors) == 1 and "still failing after 4 tries" in found.errors[0]["message"]


@pytest.mark.parametrize("endpoint,why", [("http://127.0.0.1:1", "Connection refused"),
                                          ("http://nonexistent.invalid", "does not resolve")])
def test_an_unreachable_endpoint_fails_fast_and_names_it(endpoint: str, why: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError, match=f"cannot reach {endpoint}.*{why}"):
        discover(["org/base"], options=HubOptions(endpoint=endpoint, timeout=5.0))
    assert time.perf_counter() - t0 < 15


def test_a_reachable_endpoint_passes_the_probe(fake_hub: FakeHub, hub_options: HubOptions) -> None:
    found = discover(["org/base"], options=hub_options)  # no repos: nothing found, nothing failed
    assert found.entries == [] and found.errors == []
