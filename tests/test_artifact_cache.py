"""The node agent's artifact cache (node_agent/artifact_cache.py) against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from archive_server import ArchiveServer, bundle_of, make_model

from meshserve.common.artifacts import digest_folder
from meshserve.common.backoff import Backoff
from meshserve.node_agent.artifact_cache import ArtifactCache, ArtifactRef, FetchFailed
from meshserve.node_agent.artifact_fetchers import HttpFetcher

QUICK = Backoff(initial_s=0.01, max_s=0.02, jitter=0.0)
MiB = 1 << 20


def cache_at(tmp_path, max_bytes: int = 100 * MiB, attempts: int = 3) -> ArtifactCache:
    http = HttpFetcher(max_bytes)
    return ArtifactCache(tmp_path / "cache", max_bytes, {"http": http}, attempts=attempts, backoff=QUICK)


@pytest.fixture
def server():
    with ArchiveServer() as archives:
        yield archives


def publish(server: ArchiveServer, tmp_path, name: str, factor: int = 2, weights: int = 10_000) -> ArtifactRef:
    folder = make_model(tmp_path / "published" / name, factor, weights)
    server.files[f"/{name}.tar"] = bundle_of(folder)
    return ArtifactRef(digest_folder(folder), server.url(f"/{name}.tar"), "doubler")


def test_concurrent_acquires_of_one_digest_fetch_once_and_share_one_verified_folder(server, tmp_path):
    ref = publish(server, tmp_path, "a")
    cache = cache_at(tmp_path)
    seen: list[tuple[int, int | None]] = []

    async def main():
        return await asyncio.gather(*(cache.acquire(ref, lambda d, t: seen.append((d, t))) for _ in range(5)))
    paths = asyncio.run(main())
    assert len(set(paths)) == 1 and server.gets["/a.tar"] == 1 and cache.fetches == 1
    assert digest_folder(paths[0] / "doubler") == ref.digest
    assert seen and seen[-1][0] == seen[-1][1]      # progress reached the whole size


def test_a_corrupt_or_truncated_download_is_retried_and_never_served(server, tmp_path):
    ref = publish(server, tmp_path, "a")
    server.plan["/a.tar"] = ["corrupt", "truncate"]
    cache = cache_at(tmp_path)
    path = asyncio.run(cache.acquire(ref))
    assert server.gets["/a.tar"] == 3
    assert digest_folder(path / "doubler") == ref.digest
    assert not any((tmp_path / "cache" / "tmp").iterdir())          # failed attempts left nothing


def test_a_download_that_is_always_corrupt_fails_naming_the_digest_and_leaves_no_entry(server, tmp_path):
    ref = publish(server, tmp_path, "a")
    server.plan["/a.tar"] = ["corrupt"] * 3
    cache = cache_at(tmp_path)
    with pytest.raises(FetchFailed, match="content digest is sha256:"):
        asyncio.run(cache.acquire(ref))
    assert list((tmp_path / "cache" / "entries").iterdir()) == [] and not cache.holds(ref)


def test_an_http_error_is_the_reason(server, tmp_path):
    ref = publish(server, tmp_path, "a")
    server.plan["/a.tar"] = [403] * 3
    with pytest.raises(FetchFailed, match="HTTP 403 Forbidden from http://127.0.0.1"):
        asyncio.run(cache_at(tmp_path).acquire(ref))


def test_unused_entries_are_evicted_least_recently_used_first_and_used_ones_never(server, tmp_path):
    refs = [publish(server, tmp_path, name, weights=400_000) for name in ("a", "b", "c")]
    cache = cache_at(tmp_path, max_bytes=1 * MiB)        # room for two of them

    async def main():
        first = await cache.acquire(refs[0])               # held throughout
        await cache.acquire(refs[1])
        cache.release(refs[1])
        await cache.acquire(refs[2])                        # over the bound: b goes, a is in use
        assert cache.holds(refs[0]) and not cache.holds(refs[1]) and cache.holds(refs[2])
        assert first.exists() and cache.used_bytes <= 1 * MiB
        cache.release(refs[2])
        await cache.acquire(refs[1])                        # c is unused and oldest now: it goes
        assert cache.holds(refs[0]) and cache.holds(refs[1]) and not cache.holds(refs[2])
    asyncio.run(main())
    assert server.gets["/b.tar"] == 2


def test_entries_survive_a_restart_of_the_agent(server, tmp_path):
    ref = publish(server, tmp_path, "a")
    asyncio.run(cache_at(tmp_path).acquire(ref))
    again = cache_at(tmp_path)
    path = asyncio.run(again.acquire(ref))
    assert server.gets["/a.tar"] == 1 and again.fetches == 0
    assert digest_folder(path / "doubler") == ref.digest


def test_replicas_of_one_revision_share_one_fetch_report_progress_and_run_on_the_cached_copy(server, tmp_path):
    from test_node_agent_supervisor import FakeLauncher, fake_supervisor

    from meshserve.node_agent.replica import ReplicaSpec

    ref = publish(server, tmp_path, "a", weights=3_000_000)
    cache = cache_at(tmp_path)
    launcher = FakeLauncher("serve")
    messages: set[str] = set()

    def both_ready(statuses) -> bool:
        messages.update(status.message for status in statuses)
        return len(statuses) == 2 and all(status.state == "ready" for status in statuses)

    async def main():
        supervisor = fake_supervisor(launcher, artifacts=cache)
        supervisor.apply([ReplicaSpec.create(f"r{i}", deployment="d", revision=1, model_name="doubler",
                                             artifact_digest=ref.digest, artifact_source=ref.source)
                          for i in range(2)])
        try:
            await supervisor.wait_for(both_ready, timeout=30)
        finally:
            await supervisor.drain_all()
    asyncio.run(main())
    assert server.gets["/a.tar"] == 1
    repositories = {argv[argv.index("--model-repository") + 1] for argv, _ in launcher.commands}
    assert len(repositories) == 1
    assert digest_folder(f"{repositories.pop()}/doubler") == ref.digest
    assert any(m.startswith("fetching ") and m.endswith(" MB") and "/" in m for m in messages), messages
