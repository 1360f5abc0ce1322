"""vigil's wire contract: every message and every stream, defined once.

Messages are msgspec Structs encoded as JSON so `nats sub` and `nats stream view` stay readable;
each carries the headers `Vigil-Type` and `Vigil-Version`.
"""

from proto.messages import (
    Alert,
    Box,
    DeadLetter,
    Detections,
    EventClosed,
    FileUploaded,
    GpuProcess,
    GpuSample,
    HealthChanged,
    Heartbeat,
    LabelSummary,
    Message,
    RetentionReport,
    decode,
    encode,
    headers_for,
    printable,
    unsafe_field,
)
from proto.topology import CONSUMERS, STREAMS, ConsumerSpec, StreamSpec, subject

__all__ = [
    "Alert",
    "Box",
    "CONSUMERS",
    "ConsumerSpec",
    "DeadLetter",
    "Detections",
    "EventClosed",
    "FileUploaded",
    "GpuProcess",
    "GpuSample",
    "HealthChanged",
    "Heartbeat",
    "LabelSummary",
    "Message",
    "RetentionReport",
    "STREAMS",
    "StreamSpec",
    "decode",
    "encode",
    "headers_for",
    "printable",
    "unsafe_field",
    "subject",
]
