"""The rollout server's VersionGate (rollout/server_routes.py) with both orderings of a generate and a weight
commit forced step by step: each generate runs wholly on one weight version.

The end-to-end race on a real server is `test_server.py::test_concurrent_generate_is_wholly_old_or_new`; here
each interleaving is made to happen, not hoped for."""

from __future__ import annotations

import asyncio

from aapo_megatron.rollout.server_routes import VersionGate


async def _settle() -> None:
    for _ in range(5):  # let every runnable task take its next step
        await asyncio.sleep(0)


def test_commit_waits_for_a_running_generate_and_holds_new_ones_back():
    async def scenario() -> list:
        gate, log, version = VersionGate(), [], [0]
        release_first = asyncio.Event()

        async def generate(name: str, hold: asyncio.Event = None):
            await gate.acquire_read()
            seen = version[0]
            log.append(f"{name} starts on v{seen}")
            if hold is not None:
                await hold.wait()
            assert version[0] == seen, f"{name}: the weights changed under a running generate"
            log.append(f"{name} ends on v{seen}")
            await gate.release_read()

        async def commit():
            await gate.acquire_write()
            version[0] += 1
            log.append(f"commit v{version[0]}")
            await gate.release_write()

        first = asyncio.create_task(generate("g1", release_first))
        await _settle()
        writer = asyncio.create_task(commit())
        await _settle()
        assert log == ["g1 starts on v0"]  # the commit waits for the running generate
        late = asyncio.create_task(generate("g2"))
        await _settle()
        assert log == ["g1 starts on v0"]  # a generate arriving while a commit waits is held back
        release_first.set()
        await asyncio.gather(first, writer, late)
        return log

    assert asyncio.run(scenario()) == ["g1 starts on v0", "g1 ends on v0", "commit v1", "g2 starts on v1",
                                       "g2 ends on v1"]


def test_generate_waits_for_a_commit_in_progress():
    async def scenario() -> list:
        gate, log = VersionGate(), []
        finish_commit = asyncio.Event()

        async def commit():
            await gate.acquire_write()
            log.append("commit starts")
            await finish_commit.wait()
            log.append("commit ends")
            await gate.release_write()

        async def generate():
            await gate.acquire_read()
            log.append("generate")
            await gate.release_read()

        writer = asyncio.create_task(commit())
        await _settle()
        reader = asyncio.create_task(generate())
        await _settle()
        assert log == ["commit starts"]  # the generate does not run on half-applied weights
        finish_commit.set()
        await asyncio.gather(writer, reader)
        return log

    assert asyncio.run(scenario()) == ["commit starts", "commit ends", "generate"]
