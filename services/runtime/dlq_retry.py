"""Dead letters that a retry can fix, retried automatically (the seed system's "transient failure recovery").

A letter is `transient` when its deliveries were used up by a crash, a hang or a timeout, or by errors
of the server or database being away - not by its content. Such a letter is re-published to its stage's
input subject once that stage is healthy again, after `health.dlq_retry_seconds` x 4^retries (5 min,
20 min, 80 min by default), at most `health.dlq_retry_max` times; the count travels with the message in
the Vigil-Retry header and comes back in a new letter if it fails again. `vigil dlq list` shows, per
letter, whether and when it will be retried (`plan`). Health runs the loop: it knows the verdicts.

Where a letter may go is decided here for both the loop and `vigil dlq retry` (`target`): only the
pipeline subject of the letter's own stage and stream, with a camera token that matches the payload,
and only a payload that decodes as that stage's input type. Only vigil's own headers are kept.
"""

from __future__ import annotations

import contextlib
import time

import msgspec
from nats.js.api import Header

import proto
from proto.messages import RETRY_HEADER, TYPE_HEADER, VERSION_HEADER, valid_camera
from proto.topology import dlq_subject_stage
from proto.topology import token as subject_token

# stage -> stream it consumes -> (subject kind, message type)
STAGE_INPUTS: dict[str, dict[str, tuple[str, type]]] = {
    "detector": {"UPLOADS": ("uploads", proto.FileUploaded)},
    "aggregator": {"DETECTIONS": ("detections", proto.Detections)},
    "recorder": {
        "DETECTIONS": ("detections", proto.Detections),
        "EVENTS": ("events", proto.EventClosed),
        "ALERTS": ("alerts", proto.Alert),
        "GPU": ("gpu", proto.GpuSample),
        "ANALYSIS": ("analysis", proto.EventAnalyzed),
    },
    "analyzer": {"EVENTS": ("events", proto.EventClosed)},
    "notifier": {
        "ANALYSIS": ("analysis", proto.EventAnalyzed),
        "ALERTS": ("alerts", proto.Alert),
        "NOTIFY": ("notify", proto.Notification),
    },
}


class NotRetryable(ValueError):
    """The letter cannot go back into the pipeline (and why)."""


def target(letter: proto.DeadLetter, letter_subject: str) -> tuple[str, bytes]:
    """(subject, payload) a retry of `letter` (stored under `letter_subject`) publishes, or NotRetryable
    with the reason. The stage is the one of the letter's subject: a letter written by the aggregator
    that claims to be the detector's would otherwise be re-published into UPLOADS by health or the admin."""
    if dlq_subject_stage(letter_subject) != letter.stage:
        raise NotRetryable(
            f"a letter of stage {letter.stage!r} written under {letter_subject!r}: not its stage's letter"
        )
    inputs = STAGE_INPUTS.get(letter.stage)
    if inputs is None:
        raise NotRetryable(
            f"stage {letter.stage!r} takes no messages from the bus (a watcher letter is a refused file:"
            " fix or replace the file and the watcher reads it again)"
        )
    kind_type = inputs.get(letter.original_stream or "")
    if kind_type is None:
        raise NotRetryable(f"stage {letter.stage} does not consume stream {letter.original_stream!r}")
    kind, expected = kind_type
    if letter.original_size > len(letter.original_payload.encode()):
        raise NotRetryable("the payload was cut when it was dead-lettered")
    data = letter.original_payload.encode()
    try:
        value = proto.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise NotRetryable(f"the payload is not a valid {expected.__name__}: {exc}") from None
    if not isinstance(value, expected):
        raise NotRetryable(
            f"the payload is a {type(value).__name__}, not the {expected.__name__} stage {letter.stage} takes"
        )
    token = getattr(value, "camera", None) if kind != "gpu" else subject_token(getattr(value, "host", ""))
    if not token or (kind != "gpu" and not valid_camera(token)):
        raise NotRetryable("the payload names no valid camera")
    subject = proto.subject(kind, token)
    if letter.original_subject != subject:
        raise NotRetryable(f"the letter's subject {letter.original_subject!r} does not match its payload ({subject})")
    return subject, data


def headers(letter: proto.DeadLetter, seq: int, retries: int, msg_id: str) -> dict[str, str]:
    """Only vigil's own headers go back (a forged Nats-* or any other header stays behind)."""
    out = {k: v for k, v in letter.original_headers.items() if k in (TYPE_HEADER, VERSION_HEADER)}
    out[RETRY_HEADER] = str(retries)
    out[Header.MSG_ID.value] = msg_id
    return out


def plan(
    letter: proto.DeadLetter, letter_subject: str, first_delay: float, max_retries: int
) -> tuple[float | None, str]:
    """(when it will be retried automatically, or None; what to tell the operator)."""
    if not letter.transient:
        return None, "no: its content was refused (fix it, then `vigil dlq retry`)"
    if first_delay <= 0:
        return None, "no: automatic retries are off (health.dlq_retry_seconds = 0)"
    if letter.retries >= max_retries:
        return None, f"no: {letter.retries} automatic retries used"
    try:
        target(letter, letter_subject)
    except NotRetryable as exc:
        return None, f"no: {exc}"
    when = letter.failed_at + first_delay * 4**letter.retries
    return (
        when,
        f"auto at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))} ({letter.retries + 1}/{max_retries}, once {letter.stage} is healthy)",
    )


class RetryBook:
    """Health's view of the DLQ for retrying: letters read once each (new sequences only), then
    re-published when due and their stage is healthy, and deleted from the DLQ."""

    def __init__(self, first_delay: float, max_retries: int) -> None:
        self.first_delay, self.max_retries = first_delay, max_retries
        self.next_seq = 0
        self.due: dict[int, tuple[float, proto.DeadLetter, str]] = {}  # seq -> (when, letter, its subject)

    async def scan(self, js) -> None:
        import nats.js.errors

        from services.runtime.dead_letters import stored_letters

        try:
            first = (await js.stream_info("DLQ")).state.first_seq
            async for seq, subject, letter in stored_letters(js, start=self.next_seq):
                self.next_seq = seq + 1
                if isinstance(letter, proto.DeadLetter):  # not one (undecodable): nothing to retry
                    when, _ = plan(letter, subject, self.first_delay, self.max_retries)
                    if when is not None:
                        self.due[seq] = (when, letter, subject)
        except nats.js.errors.NotFoundError:
            return
        for seq in [s for s in self.due if s < first]:
            del self.due[seq]  # aged out or purged

    async def retry_due(self, js, now: float, healthy: set[str], log) -> int:
        """Re-publish what is due for healthy stages; returns how many went."""
        import nats.js.errors

        done = 0
        for seq, (when, letter, letter_subject) in sorted(self.due.items()):
            if when > now or letter.stage not in healthy:
                continue
            subject, data = target(letter, letter_subject)
            n = letter.retries + 1
            await js.publish(subject, data, headers=headers(letter, seq, n, f"autoretry-{seq}-{n}"))
            with contextlib.suppress(nats.js.errors.NotFoundError):  # retried by hand, or purged, meanwhile
                await js.delete_msg("DLQ", seq)
            del self.due[seq]
            done += 1
            log.info(
                "dead letter retried automatically",
                seq=seq,
                stage=letter.stage,
                subject=subject,
                retry=n,
                path=letter.path,
            )
        return done
