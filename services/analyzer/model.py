"""The model analyzer: an OpenAI-compatible chat-completions endpoint (llama.cpp server, Ollama, vLLM)
judges an event from its facts (and, for a vision model, its best frame). Its reply must be the JSON of
`ModelVerdict`; anything else - no answer in time, a refused connection, an HTTP error, prose, a score
of 150 - is a `ModelFailed` with the reason, and the analyzer publishes the rules' result instead."""

from __future__ import annotations

import base64
import re
from typing import Annotated

import aiohttp
import cv2
import msgspec
import stamina

from proto import EventClosed, printable
from services.analyzer import snapshot
from services.analyzer.rules import Judgement
from services.runtime import timeranges
from services.runtime.config import ModelConfig

MAX_SIDE = 1024  # the frame sent to a vision model is scaled down to this
MAX_REPLY_BYTES = 1024 * 1024


class ModelFactor(msgspec.Struct, forbid_unknown_fields=False):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
    points: Annotated[int, msgspec.Meta(ge=-100, le=100)]
    detail: Annotated[str, msgspec.Meta(max_length=300)] = ""


class ModelVerdict(msgspec.Struct, forbid_unknown_fields=False):
    """What the model must answer (asked for in the prompt, and by response_format json_object)."""

    risk_score: Annotated[int, msgspec.Meta(ge=0, le=100)]
    summary: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    factors: Annotated[list[ModelFactor], msgspec.Meta(max_length=20)] = []


class _Message(msgspec.Struct, forbid_unknown_fields=False):
    content: str | None = None


class _Choice(msgspec.Struct, forbid_unknown_fields=False):
    message: _Message


class _Completion(msgspec.Struct, forbid_unknown_fields=False):
    choices: Annotated[list[_Choice], msgspec.Meta(min_length=1)]


class ModelFailed(Exception):
    """The endpoint gave no usable verdict; str() is the reason, as the fallback result shows it."""


SYSTEM_PROMPT = (
    "You judge events from a home security camera for the person who owns it. Reply with JSON only, no prose:"
    ' {"risk_score": <integer 0-100>, "summary": "<one short sentence for a phone notification>",'
    ' "factors": [{"name": "<short>", "points": <integer>, "detail": "<why>"}]}.'
    " 0-29 is low (animals, passing cars), 30-59 medium, 60-84 high, 85-100 critical (a person where"
    " nobody should be, at night)."
)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def facts(ev: EventClosed, rules: Judgement, timezone: str | None) -> dict:
    when = timeranges.local(ev.started_at, timezone)
    return {
        "camera": ev.camera,
        "local_time": when.strftime("%Y-%m-%d %H:%M %Z"),
        "night": rules.night,
        "duration_seconds": round(ev.ended_at - ev.started_at, 1),
        "labels": {
            k: {"detections": v.count, "best_score": round(v.max_score, 2)} for k, v in sorted(ev.labels.items())
        },
        "zones": rules.zones,
        "rule_based_score": rules.score,
    }


def best_frame(media_root: str, ev: EventClosed) -> bytes | None:
    """The event's best frame as a JPEG no larger than MAX_SIDE, or None when it cannot be read (the
    model then judges from the facts alone). Runs in a thread: it decodes."""
    try:
        frame = snapshot.read_frame(media_root, ev)
    except snapshot.FrameUnreadable:
        return None
    h, w = frame.shape[:2]
    if max(h, w) > MAX_SIDE:
        k = MAX_SIDE / max(h, w)
        frame = cv2.resize(frame, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return jpeg.tobytes() if ok else None


class ModelClient:
    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, api_key: str | None) -> None:
        self.cfg, self.session = cfg, session
        self.api_key = api_key
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, facts_: dict, image: bytes | None) -> bytes:
        text = "Judge this camera event:\n" + msgspec.json.encode(facts_).decode()
        content: str | list = text
        if image is not None:
            url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        return msgspec.json.encode(
            {
                "model": self.cfg.model,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
                "temperature": 0,
                "max_tokens": self.cfg.max_tokens,
                "response_format": {"type": "json_object"},
            }
        )

    async def ask_once(self, body: bytes) -> ModelVerdict:
        try:
            async with (
                self.session.post(
                    self.cfg.url,
                    data=body,
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
                ) as resp,
            ):
                raw = b""
                async for chunk in resp.content.iter_chunked(65536):
                    raw += chunk
                    if len(raw) > MAX_REPLY_BYTES:
                        raise ModelFailed(f"model endpoint's answer is larger than {MAX_REPLY_BYTES} bytes")
                if resp.status != 200:
                    snippet = self.scrub(printable(raw[:200].decode("utf-8", "replace")).strip())
                    raise ModelFailed(f"model endpoint answered HTTP {resp.status}: {snippet}")
        except TimeoutError:
            raise ModelFailed(f"model endpoint did not answer within {self.cfg.timeout_seconds:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise ModelFailed(f"model endpoint unreachable: {self.scrub(printable(str(exc)))[:200]}") from None
        except aiohttp.ClientError as exc:
            raise ModelFailed(f"model endpoint failed: {self.scrub(printable(repr(exc)))[:200]}") from None
        try:
            return parse_reply(raw)
        except ModelFailed as exc:
            raise ModelFailed(self.scrub(str(exc))) from None

    def scrub(self, text: str) -> str:
        """An endpoint may echo what it refused ("invalid API key sk-..."): never into a result, a log or health."""
        return text.replace(self.api_key, "***") if self.api_key else text

    async def ask(self, facts_: dict, image: bytes | None) -> ModelVerdict:
        """The verdict, after up to `attempts` tries with backoff (stamina); ModelFailed with the last reason."""
        body = self.request(facts_, image)
        async for attempt in stamina.retry_context(
            on=ModelFailed, attempts=self.cfg.attempts, wait_initial=0.5, wait_max=5.0, timeout=None
        ):
            with attempt:
                return await self.ask_once(body)
        raise AssertionError("unreachable")  # stamina re-raises the last ModelFailed


def parse_reply(raw: bytes) -> ModelVerdict:
    try:
        completion = msgspec.json.decode(raw, type=_Completion)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelFailed(f"model endpoint's answer is not a chat completion: {printable(str(exc))[:200]}") from None
    content = (completion.choices[0].message.content or "").strip()
    m = _FENCE.match(content)
    if m:  # some models wrap their JSON in a Markdown code fence whatever they are told
        content = m.group(1)
    try:
        verdict = msgspec.json.decode(content.encode(), type=ModelVerdict)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelFailed(f"model reply does not match the schema: {printable(str(exc))[:200]}") from None
    verdict.summary = printable(verdict.summary.strip())
    for f in verdict.factors:
        f.name, f.detail = printable(f.name), printable(f.detail)
    return verdict
