"""The analyzer as a real process on a real nats-server, judging with a model served by a real HTTP
server on loopback that speaks the chat-completions API: good, malformed, slow, HTTP 500 and refused
answers each give a result (the rules', flagged fallback with the reason), nothing is lost, and health
sees the analyzer degraded until the model answers again."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import nats
import pytest
from aiohttp import web

import proto
from proto import EventClosed, LabelSummary, Spot
from services.cli.stack import free_port
from services.runtime.jetstream import stored_messages
from tests.support import LoopbackHTTP, wait_until_async


def completion(content: str) -> web.Response:
    body = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    return web.json_response(body)


MODES = {
    "good": lambda: completion(
        json.dumps(
            {
                "risk_score": 88,
                "summary": "A person at the door.",
                "factors": [{"name": "person", "points": 88, "detail": "seen"}],
            }
        )
    ),
    "malformed": lambda: completion("Sure! The risk is quite high, I would say."),
    "http500": lambda: web.Response(status=500, text="CUDA out of memory"),
}


def event(i: int) -> EventClosed:
    return EventClosed(
        event_id=f"ev-{i:04d}",
        camera="front_door",
        started_at=1_780_000_000.0 + i * 100,
        ended_at=1_780_000_005.0 + i * 100,
        file_ids=[f"f{i}"],
        labels={"person": LabelSummary(count=2, max_score=0.9)},
        best_file_id=f"f{i}",
        close_reason="idle",
        spots=[Spot("person", 100, 500, 0.9)],
    )


async def publish(js, ev: EventClosed) -> None:
    await js.publish(
        proto.subject("events", ev.camera),
        proto.encode(ev),
        headers=proto.headers_for(ev, f"{ev.event_id}-r{ev.revision}"),
    )


async def analysis_of(js, event_id: str, timeout: float = 30.0) -> proto.EventAnalyzed:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async for _, msg in stored_messages(js, "ANALYSIS"):
            a = proto.decode(msg.data)
            if a.event_id == event_id:
                return a
        await asyncio.sleep(0.2)
    raise AssertionError(f"no analysis of {event_id} within {timeout}s")


async def status(port: int) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/status") as resp:
        return await resp.json()


async def verdict_is(port: int, want: str) -> bool:
    return await analyzer_verdict(port) == want


async def analyzer_verdict(port: int) -> str:
    """What health says of the analyzer (its /status, as the operator's page and `vigil status` show it)."""
    services = [s for s in (await status(port)).get("services", []) if s["service"] == "analyzer" and s["instance"]]
    return services[0]["verdict"] if services else "absent"


@pytest.mark.timeout(180)
async def test_every_model_failure_gives_the_rules_result_flagged_with_its_reason(make_stack, nats_server):
    mode = {"now": "good"}

    async def handler(request, n):
        body = json.loads(await request.read())
        assert body["messages"][0]["role"] == "system" and body["response_format"] == {"type": "json_object"}
        if mode["now"] == "slow":
            await asyncio.sleep(3)
            return MODES["good"]()
        return MODES[mode["now"]]()

    server = LoopbackHTTP(handler)
    health_port = free_port()
    stack = make_stack(
        analyzer={
            "timezone": "UTC",
            "model": {
                "url": f"{server.url}/v1/chat/completions",
                "model": "test-llm",
                "timeout_seconds": 1.0,
                "attempts": 2,
                "retry_seconds": 0.0,
            },
        },
        health={"http_port": health_port, "expected_services": ["analyzer"], "check_seconds": 0.5, "systemd": False},
    )
    port = server.port
    stack.start("analyzer", "health")
    stack.wait_ready("analyzer", "health")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    expected = [
        ("good", False, None),
        ("malformed", True, "model reply does not match the schema"),
        ("slow", True, "model endpoint did not answer within 1 s"),
        ("http500", True, "model endpoint answered HTTP 500: CUDA out of memory"),
        ("refused", True, "model endpoint unreachable"),
        ("good", False, None),  # it answers again: no longer degraded
    ]
    try:
        # a poison event first (a time no calendar holds): dead-lettered with the reason, the rest go on
        poison = event(999)
        poison.started_at = poison.ended_at = 1e300
        await publish(js, poison)
        for i, (m, fallback, reason) in enumerate(expected):
            if m == "refused":
                server.close()
                server = None
            elif server is None:
                server = LoopbackHTTP(handler, port=port)
            mode["now"] = m
            await publish(js, event(i))
            a = await analysis_of(js, f"ev-{i:04d}")
            assert a.fallback is fallback, (m, a)
            if fallback:
                assert reason in (a.fallback_reason or ""), (m, a.fallback_reason)
                assert a.analyzer.name == "rules"
                # the rules' own judgement, not a flat 50: a person (2 detections, 0.9) in no zone, 5 s, by day
                assert a.risk_score == 40 + 3 + 1 + 8 and a.factors[0].name == "label person"
                await wait_until_async(lambda: verdict_is(health_port, "degraded"), "the analyzer degraded", timeout=15)
            else:
                assert (a.analyzer.name, a.analyzer.version, a.risk_score, a.risk_level) == (
                    "model",
                    "test-llm",
                    88,
                    "critical",
                )
                assert a.summary == "A person at the door." and a.factors[0].name == "person"
                await wait_until_async(lambda: verdict_is(health_port, "healthy"), "the analyzer healthy", timeout=15)
        # nothing lost: one analysis per event, every event acked
        info = await js.consumer_info("EVENTS", "analyzer")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        assert (await js.stream_info("ANALYSIS")).state.messages == len(expected)
        [letter] = [proto.decode(raw.data) async for _, raw in stored_messages(js, "DLQ")]
        assert letter.stage == "analyzer" and letter.reason.startswith("cannot judge event ev-0999"), letter.reason
        # the status page's last events carry their risk
        risks = {ev["event_id"]: ev["risk"] for ev in (await status(health_port))["events"]}
        assert risks["ev-0000"] == "critical 88" and risks["ev-0001"] == "medium 52 (fallback)", risks
    finally:
        await nc.close()
        stack.stop_all()
        if server is not None:
            server.close()
