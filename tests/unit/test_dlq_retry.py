"""Where a dead letter may go back to, and when it is retried automatically (services/runtime/dlq_retry.py)."""

from __future__ import annotations

import pytest

import proto
from services.runtime import dlq_retry

HOME = "vigil.dlq.detector.front_door"  # where the detector writes its letters
UP = proto.FileUploaded(
    file_id="f", camera="front_door", path="front_door/a.jpg", size=1, mtime=1.0, sha256="0", kind="image"
)


def letter(**kw) -> proto.DeadLetter:
    base = dict(
        stage="detector",
        reason="gave up after 5 deliveries: no error was recorded",
        original_subject="vigil.uploads.front_door",
        original_payload=proto.encode(UP).decode(),
        original_size=len(proto.encode(UP)),
        original_stream="UPLOADS",
        original_headers={
            "Vigil-Type": "FileUploaded",
            "Vigil-Version": "1",
            "Nats-Msg-Id": "x",
            "Nats-Expected-Stream": "X",
            "Evil": "1",
        },
        failed_at=1000.0,
        transient=True,
    )
    return proto.DeadLetter(**{**base, **kw})


def test_a_letter_goes_back_only_to_its_stage_input_with_its_own_camera():
    assert dlq_retry.target(letter(), HOME) == ("vigil.uploads.front_door", proto.encode(UP))
    forged = [
        letter(original_subject="$JS.API.STREAM.DELETE.UPLOADS"),  # the review's attack: delete a stream as admin
        letter(original_subject="vigil.uploads.backyard"),  # another camera than the payload's
        letter(stage="aggregator"),  # a FileUploaded is not the aggregator's input
        letter(original_stream="DETECTIONS"),
        letter(original_payload='{"type": "FileUploaded"}'),
        letter(stage="watcher"),  # a refused file: nothing to re-publish
        letter(original_size=10**6),  # the payload was cut
    ]
    for bad in forged:
        with pytest.raises(dlq_retry.NotRetryable):
            dlq_retry.target(bad, HOME if bad.stage == "detector" else f"vigil.dlq.{bad.stage}.front_door")
    # the review's second attack: the aggregator writes a letter claiming to be the detector's, so that
    # health (or the admin) would publish its payload into UPLOADS for it
    for subject in (
        "vigil.dlq.aggregator.front_door",
        "vigil.dlq.recorder.front_door",
        "vigil.dlq.detector",
        "vigil.other.detector.x",
    ):
        with pytest.raises(dlq_retry.NotRetryable, match="not its stage"):
            dlq_retry.target(letter(), subject)
        assert dlq_retry.plan(letter(), subject, 300, 3)[0] is None


def test_only_vigil_headers_go_back():
    h = dlq_retry.headers(letter(), 7, 1, "autoretry-7-1")
    assert h == {"Vigil-Type": "FileUploaded", "Vigil-Version": "1", "Vigil-Retry": "1", "Nats-Msg-Id": "autoretry-7-1"}


def test_retry_plan_backs_off_and_stops():
    assert dlq_retry.plan(letter(), HOME, 300, 3)[0] == 1000 + 300
    assert dlq_retry.plan(letter(retries=2), HOME, 300, 3)[0] == 1000 + 300 * 16
    when, why = dlq_retry.plan(letter(retries=3), HOME, 300, 3)
    assert when is None and "3 automatic retries used" in why
    when, why = dlq_retry.plan(letter(transient=False), HOME, 300, 3)
    assert when is None and "content" in why
    assert dlq_retry.plan(letter(), HOME, 0, 3)[0] is None
