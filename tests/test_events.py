"""The in-process event log: ids, compaction, fan-out, replay after an id, listeners leaving."""
from __future__ import annotations

import asyncio
from diffusionapi.jobs.events import EventLog


def _collect(log: EventLog, job: str, after: str | None = None, then=None) -> list:
    """Follow ``job``; ``then`` (if given) publishes more once the listener is registered."""
    async def run():
        task = asyncio.create_task(_gather(log.follow(job, after)))
        await asyncio.sleep(0.02)
        if then:
            then()
        return await asyncio.wait_for(task, 5)
    return asyncio.run(run())


async def _gather(it) -> list:
    return [e async for e in it]


def test_follow_replays_then_ends_with_the_final_event():
    log = EventLog()
    log.publish("j", "queued", {"position": 2})
    log.publish("j", "queued", {"position": 1})
    log.publish("j", "started")
    for step in (1, 2, 3):
        log.publish("j", "progress", {"step": step})
    events = _collect(log, "j", then=lambda: log.publish("j", "done", {"image": "x"}))
    # Compacted: only the newest queued/progress remain, in id order, final last.
    assert [(e.type, e.data) for e in events] == [("queued", {"position": 1}), ("started", {}),
                                                  ("progress", {"step": 3}), ("done", {"image": "x"})]
    numbers = [int(e.id.rsplit("-", 1)[1]) for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_events_after_the_final_one_are_dropped():
    log = EventLog()
    assert [e.type for e in _collect(log, "j", then=lambda: log.publish("j", "cancelled", {}))] == ["cancelled"]
    assert log.publish("j", "progress", {"step": 9}) is None
    assert [e.type for e in log.after("j", None)] == ["cancelled"]


def test_live_fan_out_to_two_listeners_and_reconnect_after_an_id():
    log = EventLog()
    log.open("j")

    async def scenario():
        got_a, got_b = [], []

        async def listen(out):
            async for e in log.follow("j"):
                out.append(e)

        tasks = [asyncio.create_task(listen(got_a)), asyncio.create_task(listen(got_b))]
        await asyncio.sleep(0.05)

        def produce():  # from another thread, as the worker does
            log.publish("j", "started")
            log.publish("j", "progress", {"step": 1})
            log.publish("j", "done", {"ok": True})

        await asyncio.to_thread(produce)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return got_a, got_b

    a, b = asyncio.run(scenario())
    assert [e.type for e in a] == ["started", "progress", "done"]
    assert [e.id for e in a] == [e.id for e in b]
    # A client that saw "started" reconnects: it gets the rest, including the final event.
    rest = _collect(log, "j", a[0].id)
    assert [e.type for e in rest] == ["progress", "done"]
    assert _collect(log, "j", a[-1].id) == []  # it had the final one already: the stream just ends


def test_an_id_from_another_epoch_replays_everything():
    old = EventLog()
    old.publish("j", "started")
    stale = old.publish("j", "progress", {"step": 5}).id
    new = EventLog()  # the server restarted
    new.publish("j", "started")
    _collect(new, "j", then=lambda: new.publish("j", "done", {}))
    assert [e.type for e in new.after("j", stale)] == ["started", "done"]
    assert [e.type for e in new.after("j", "garbage")] == ["started", "done"]


def test_a_listener_that_leaves_is_forgotten_and_unlistened_final_logs_are_not_kept():
    log = EventLog()
    log.open("j")

    async def leave_early():
        async for e in log.follow("j"):
            if e.type == "started":
                break
    log.publish("j", "started")
    asyncio.run(leave_early())
    assert not log._logs["j"].waiters
    log.publish("j", "done", {})
    assert log.final("j") is not None  # someone listened: kept for reconnects

    log.open("k")
    log.publish("k", "done", {})
    assert not log.has("k")  # nobody listened: nothing to keep


def test_final_logs_expire_after_the_retention():
    log = EventLog(retention_sec=0)
    _collect(log, "j", then=lambda: log.publish("j", "done", {}))
    log.publish("other", "started")  # publishing prunes expired logs
    assert not log.has("j")
