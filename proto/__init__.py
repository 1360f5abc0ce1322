"""vigil's wire contract: every message and every stream, defined once.

Messages are msgspec Structs encoded as JSON so `nats sub` and `nats stream view` stay readable;
each carries the headers `Vigil-Type` and `Vigil-Version`.
"""

from proto.messages import (
    Alert,
    AnalyzerInfo,
    Box,
    DeadLetter,
    Detections,
    EventAnalyzed,
    EventClosed,
    Factor,
    FileUploaded,
    GpuProcess,
    GpuSample,
    HealthChanged,
    Heartbeat,
    LabelSummary,
    Message,
    Notification,
    RetentionReport,
    Spot,
    decode,
    encode,
    headers_for,
    printable,
    unsafe_field,
)
from proto.topology import CONSUMERS, STREAMS, ConsumerSpec, StreamSpec, subject

__all__ = [
    "CONSUMERS",
    "STREAMS",
    "Alert",
    "AnalyzerInfo",
    "Box",
    "ConsumerSpec",
    "DeadLetter",
    "Detections",
    "EventAnalyzed",
    "EventClosed",
    "Factor",
    "FileUploaded",
    "GpuProcess",
    "GpuSample",
    "HealthChanged",
    "Heartbeat",
    "LabelSummary",
    "Message",
    "Notification",
    "RetentionReport",
    "Spot",
    "StreamSpec",
    "decode",
    "encode",
    "headers_for",
    "printable",
    "subject",
    "unsafe_field",
]
