"""Dead letters as an operator handles them: list, show, retry (back onto the stage's input subject,
checked by services/runtime/dlq_retry.py) and purge. One body for `vigil dlq` and the web UI."""

from __future__ import annotations

import time

import msgspec

import proto
from proto.topology import dlq_subject_stage
from services.runtime import dlq_retry
from services.runtime.config import Config
from services.runtime.dead_letters import stored_letters


async def dead_letters(js) -> list[tuple[int, str, proto.DeadLetter | str]]:
    return [letter async for letter in stored_letters(js)]


async def operate(
    js, config: Config, action: str, seq: int | None, confirm=lambda letter, subject: True
) -> dict | list:
    """`vigil dlq list|show|retry|purge` and the web UI's Dead letters page, on a JetStream context of
    theirs. `confirm(letter, subject)` is asked before a retry re-publishes, with the checked target."""
    if action == "purge":  # without reading the letters: an undecodable one must not stop a purge
        messages = (await js.stream_info("DLQ")).state.messages
        await js.purge_stream("DLQ")
        return {"purged": messages}
    letters = await dead_letters(js)
    if action == "list":
        h = config.health
        return [
            {
                "seq": s,
                "stage": d.stage,
                "reason": d.reason,
                "camera": d.camera,
                "file_id": d.file_id,
                "path": d.path,
                "original_subject": d.original_subject,
                "failed_at": d.failed_at,
                "transient": d.transient,
                "retries": d.retries,
                "retry_at": (p := dlq_retry.plan(d, subj, h.dlq_retry_seconds, h.dlq_retry_max))[0],
                "retry": p[1],
            }
            if isinstance(d, proto.DeadLetter)
            else {
                "seq": s,
                "stage": dlq_subject_stage(subj),
                "reason": d,
                "camera": None,
                "file_id": None,
                "path": None,
                "original_subject": None,
                "failed_at": None,
                "transient": False,
                "retries": 0,
                "retry_at": None,
                "retry": "no: undecodable",
            }
            for s, subj, d in letters
        ]
    if seq is None:
        raise LookupError(f"`{action}` needs a dead letter's sequence number")
    found = {s: (subj, d) for s, subj, d in letters}.get(seq)
    if found is None:
        raise LookupError(f"no dead letter with sequence {seq}")
    letter_subject, letter = found
    if isinstance(letter, str):
        if action == "show":
            return {"seq": seq, "subject": letter_subject, "undecodable": letter}
        raise LookupError(f"dead letter {seq} cannot be retried: {letter}")
    if action == "show":
        return {"seq": seq, **msgspec.to_builtins(letter)}
    # retry: the original message goes back onto its stage's input subject (checked: services/runtime/dlq_retry.py),
    # so the stage that refused it sees it again. A fresh Nats-Msg-Id bypasses the duplicate window;
    # downstream writes are idempotent.
    try:
        subject, data = dlq_retry.target(letter, letter_subject)
    except dlq_retry.NotRetryable as exc:
        raise LookupError(f"dead letter {seq} cannot be retried: {exc}") from None
    if not confirm(letter, subject):
        return {"retried": None, "seq": seq, "subject": subject, "cancelled": True}
    headers = dlq_retry.headers(letter, seq, letter.retries, f"retry-{seq}-{int(time.time())}")
    ack = await js.publish(subject, data, headers=headers)
    await js.delete_msg("DLQ", seq)
    return {"retried": seq, "subject": subject, "stream": ack.stream, "seq": ack.seq}
