"""analyzer: EventClosed -> EventAnalyzed (vigil.analysis.<camera>), every revision.

Each event revision is judged by the rules (services/analyzer/rules.py) and, when [analyzer.model] is
set, by the model (services/analyzer/model.py) with the rules' result as its fallback: a model that is
down, slow or answers nonsense never loses an event, it only makes the result `fallback = true` with the
reason (and this service degraded until the model answers again). Published with Nats-Msg-Id
`<event_id>-r<revision>`, acked after the PubAck.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import msgspec
from nats.aio.msg import Msg

import proto
from proto import SNAPSHOTS_DIR, AnalyzerInfo, EventAnalyzed, EventClosed, Factor, subject
from proto.messages import risk_level
from services.analyzer import model, rules, snapshot
from services.runtime import jetstream
from services.runtime.config import Config, ConfigError, credential
from services.runtime.service import Runtime

STAGE = "analyzer"


class Analyzer:
    def __init__(self, rt: Runtime, config: Config, client: model.ModelClient | None) -> None:
        self.rt, self.config, self.cfg = rt, config, config.analyzer
        self.client = client
        self.skip_model_until = 0.0  # monotonic: after a failure the model rests for model.retry_seconds
        self.last_failure = ""
        self.model_slots = asyncio.Semaphore(self.cfg.model.concurrency if self.cfg.model else 1)
        self.snapshots = snapshot_root(config)
        self.describe(None)

    def describe(self, failure: str | None) -> None:
        m = self.cfg.model
        base = f"analyzer {rules.VERSION}" + (f", model {m.model}" if m else "")
        self.rt.status_extra = f"{base}, degraded: model fallback ({failure})"[:300] if failure else base

    def result(self, ev: EventClosed, j: rules.Judgement, info: AnalyzerInfo, **kw) -> EventAnalyzed:
        return EventAnalyzed(
            event_id=ev.event_id,
            revision=ev.revision,
            camera=ev.camera,
            risk_score=j.score,
            risk_level=j.level,
            summary=j.summary,
            factors=j.factors,
            analyzer=info,
            analyzed_at=time.time(),
            started_at=ev.started_at,
            ended_at=ev.ended_at,
            labels=sorted(ev.labels),
            zones=j.zones,
            best_path=ev.best_path,
            **kw,
        )

    async def analyze(self, ev: EventClosed) -> EventAnalyzed:
        cam = rules.camera_rules(self.cfg, ev.camera)
        j = rules.judge(ev, cam)
        by_rules = AnalyzerInfo(name="rules", version=rules.VERSION)
        if self.client is None or self.cfg.model is None:
            return self.result(ev, j, by_rules)
        try:
            async with self.model_slots:
                # asked again once a slot is ours: the events queued behind a failure do not each wait
                # out the timeout of a model that has stopped answering
                if time.monotonic() < self.skip_model_until:
                    self.rt.count("fallbacks")
                    return self.result(
                        ev, j, by_rules, fallback=True, fallback_reason=f"model resting: {self.last_failure}"
                    )
                image = None
                if self.cfg.model.vision:
                    image = await asyncio.to_thread(model.best_frame, self.config.media_root, ev)
                verdict = await self.client.ask(model.facts(ev, j, cam.timezone), image)
        except model.ModelFailed as exc:
            reason = str(exc)
            self.last_failure = reason
            self.skip_model_until = time.monotonic() + self.cfg.model.retry_seconds
            self.rt.count("fallbacks")
            self.rt.note_error(reason)
            self.describe(reason)
            self.rt.log.warning("model failed, publishing the rules' result", event_id=ev.event_id, reason=reason)
            return self.result(ev, j, by_rules, fallback=True, fallback_reason=reason)
        if self.last_failure:
            self.rt.log.info("model answers again", after=self.last_failure)
            self.last_failure = ""
            self.describe(None)
        self.rt.count("model_verdicts")
        score = verdict.risk_score
        return msgspec.structs.replace(
            self.result(ev, j, AnalyzerInfo(name="model", version=self.cfg.model.model)),
            risk_score=score,
            risk_level=risk_level(score),
            summary=verdict.summary,
            factors=[Factor(name=f.name, points=f.points, detail=f.detail) for f in verdict.factors],
        )

    async def handle_batch(self, msgs: list[Msg]) -> None:
        todo: list[tuple[Msg, EventClosed]] = []
        for msg in msgs:
            ev = jetstream.decode_as(msg, EventClosed)
            if isinstance(ev, str):
                await self.rt.bus.dead_letter(STAGE, msg, ev)
            else:
                todo.append((msg, ev))
        if not todo:
            return
        # ack_wait is 60 s; a model's answer is bounded by its timeout x attempts
        async with jetstream.held([m for m, _ in todo], every=10.0, alive=self.rt.keepalive):
            outcomes = await asyncio.gather(*(self.judged(ev) for _, ev in todo))
        done: list[tuple[Msg, EventAnalyzed]] = []
        for (msg, ev), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, str):  # this event cannot be judged: never a crash loop over it
                await self.rt.bus.dead_letter(STAGE, msg, outcome, camera=ev.camera)
            else:
                done.append((msg, outcome))
        await self.rt.bus.publish_many(
            [(subject("analysis", r.camera), r, f"{r.event_id}-r{r.revision}") for _, r in done]
        )
        await asyncio.gather(*(m.ack() for m, _ in done), return_exceptions=True)
        self.rt.count("analyzed", len(done))
        for _, r in done:
            self.rt.count(f"risk_{r.risk_level}")

    async def snapshot(self, ev: EventClosed) -> snapshot.Made:
        """The revision's snapshot, or why there is none: never a reason not to publish the analysis."""
        cam = self.cfg.cameras.get(ev.camera)
        if not ev.best_path:  # nothing to draw (no thread, no warning: an event of clips none could read)
            return snapshot.Made(None, None, "the event names no best frame")
        try:
            made = await asyncio.to_thread(
                snapshot.make, self.config.media_root, self.snapshots, ev, cam.zones if cam else []
            )
        except Exception as exc:  # noqa: BLE001 - a drawing bug must cost the picture, not the judgement
            made = snapshot.Made(None, None, f"snapshot failed: {type(exc).__name__}: {exc}"[:300])
        if made.error:
            self.rt.count("snapshot_failures")
            self.rt.log.warning("no snapshot", event_id=ev.event_id, reason=made.error)
        elif made.written_bytes:
            self.rt.count("snapshots")
        return made

    async def judged(self, ev: EventClosed) -> EventAnalyzed | str:
        """The analysis, or why this event cannot have one (a time no calendar holds, say 1e300 s)."""
        try:
            made, result = await asyncio.gather(self.snapshot(ev), self.analyze(ev))
            result.snapshot, result.thumbnail, result.snapshot_error = made.snapshot, made.thumbnail, made.error
            proto.encode(result)  # what publishing would refuse, refused here, where the event is known
            return result
        except Exception as exc:  # noqa: BLE001 - whatever breaks on this event must not crash-loop the stage
            return f"cannot judge event {ev.event_id}: {type(exc).__name__}: {exc}"[:500]


def snapshot_root(config: Config) -> Path:
    return Path(config.state_dir) / SNAPSHOTS_DIR


def api_key(config: Config) -> str | None:
    m = config.analyzer.model
    if m is None or m.api_key_credential is None:
        return None
    key = credential(m.api_key_credential)
    if key is None:
        raise ConfigError(
            f"config error: analyzer.model.api_key_credential: credential {m.api_key_credential!r} not found"
        )
    return key


async def run(config: Config) -> None:
    cfg = config.analyzer
    key = api_key(config)
    async with Runtime.start(STAGE, config) as rt, aiohttp.ClientSession() as session:
        client = model.ModelClient(cfg.model, session, key) if cfg.model else None
        an = Analyzer(rt, config, client)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(rt.bus.consume(STAGE, an.handle_batch, cfg.batch_size, 1.0, stage=STAGE))
            tg.create_task(rt.bus.exhausted_loop(STAGE, STAGE))
