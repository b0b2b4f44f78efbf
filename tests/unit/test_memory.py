import asyncio

from crishim.memory import MemoryReleaser, release_memory, rss_kib


def test_release_is_scheduled_once_after_a_burst_ends():
    async def go() -> tuple[bool, bool, int]:
        releaser = MemoryReleaser(min_drop=10, interval=60.0)
        for live in range(1, 41):
            releaser.sessions_changed(live)
        releaser.sessions_changed(35)  # 5 ended: not yet
        not_yet = releaser._timer is None
        releaser.sessions_changed(9)  # 31 ended, under a quarter of 40 left
        scheduled = releaser._timer is not None
        releaser.close()
        return not_yet, scheduled, releaser.high

    not_yet, scheduled, high = asyncio.run(go())
    assert not_yet and scheduled and high == 40


def test_disabled_with_zero():
    async def go() -> bool:
        releaser = MemoryReleaser(min_drop=0)
        releaser.sessions_changed(500)
        releaser.sessions_changed(0)
        return releaser._timer is None

    assert asyncio.run(go())


def test_release_memory_runs_and_rss_is_read():
    release_memory()
    assert rss_kib() > 0
