"""Gateway routing: shard configuration parsing and rendezvous hashing of ids to shards."""

from __future__ import annotations

from collections import Counter

import pytest
from grpc import aio

from imgsearch.gateway.peers import ShardClient, shard_for
from imgsearch.gateway.settings import GatewaySettings, parse_shards


def shards(n: int) -> list[ShardClient]:
    # Channels are lazy: nothing connects until a call is made.
    return [
        ShardClient(f"index-{i}", f"127.0.0.1:{1 + i}", aio.insecure_channel(f"127.0.0.1:{1 + i}")) for i in range(n)
    ]


def test_parse_shards() -> None:
    assert parse_shards("a=h:1, b=h:2") == [("a", "h:1"), ("b", "h:2")]
    assert parse_shards("h:1,h:2") == [("shard-0", "h:1"), ("shard-1", "h:2")]
    for bad in ("", "a=h:1,a=h:2", "a=nohostport"):
        with pytest.raises(ValueError):
            parse_shards(bad)


def test_settings_require_peer_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ENCODER_ADDRESS", "TAGGER_ADDRESS", "INDEX_SHARDS"):
        monkeypatch.delenv(f"IMGSEARCH_GATEWAY_{var}", raising=False)
    with pytest.raises(Exception, match="encoder_address"):
        GatewaySettings()  # type: ignore[call-arg]


async def test_routing_is_stable_balanced_and_moves_few_ids_when_a_shard_is_added() -> None:
    ids = [f"img-{i}" for i in range(3000)]
    three, four = shards(3), shards(4)
    first = {i: shard_for(i, three).name for i in ids}
    assert first == {i: shard_for(i, list(reversed(three))).name for i in ids}, "order of shards must not matter"
    counts = Counter(first.values())
    assert min(counts.values()) > 800, counts
    moved = sum(1 for i in ids if shard_for(i, four).name != first[i])
    # Rendezvous hashing moves only the ids the new shard takes (~1/4), never ids between old shards.
    assert 550 < moved < 950, moved
    assert all(shard_for(i, four).name in (first[i], "index-3") for i in ids)
