# vigil developer recipes. Run them through ./dev, which makes .venv first.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() / ".venv/bin:" + env_var("PATH")
# The detector's model folder; CI and this workplace use ../shared/models.
export VIGIL_MODELS_DIR := env_var_or_default("VIGIL_MODELS_DIR", justfile_directory() / "../shared/models")

# list the recipes
default:
    @just --list

# run the whole pipeline on the embedded NATS + PostgreSQL (Ctrl-C stops it)
up *ARGS:
    vigil up {{ARGS}}

# the whole test suite: unit tests, then integration tests against real servers, processes and a browser
test *ARGS: lint
    tests/system-packages.sh
    python -m pytest -q -rs --durations=15 {{ARGS}}

# ruff (lint and format, line length 120) on everything, mypy on proto/ and services/runtime/ (pyproject.toml)
lint:
    ruff check .
    ruff format --check .
    mypy

# unit tests only (no servers)
unit *ARGS:
    python -m pytest -q tests/unit {{ARGS}}

# every benchmark: the pipeline (model none), the reorder buffer, the aggregator alone, and the detector on the real model
bench: bench-pipeline bench-reorder bench-aggregator bench-detector bench-analyzer bench-web

# pipeline: files/s and latency end to end with the `none` model, raw fetch+ack, CPU and peak RSS per service
bench-pipeline *ARGS:
    python -m tests.bench.pipeline {{ARGS}}

# the reorder buffer's end-to-end cost: synthetic model (one person per file), buffer on vs off, with the ratio
bench-reorder *ARGS:
    python -m tests.bench.reorder {{ARGS}}

# aggregator alone: detections/s grouped for 1 and 50 cameras, peak RSS over a 100,000-detection backlog
bench-aggregator *ARGS:
    python -m tests.bench.aggregator {{ARGS}}

# JetStream sync_interval default vs always: publish msg/s and pipeline files/s, with the ratio
bench-sync *ARGS:
    python -m tests.bench.sync_interval {{ARGS}}

# one NATS server (R1) against a 3-node cluster on this machine (R3): files/s and latency, with the ratio
bench-cluster *ARGS:
    python -m tests.bench.cluster {{ARGS}}

# detector benchmark: service images/s on the real model vs a raw onnxruntime loop; batch size, decode threads
bench-detector *ARGS:
    python -m tests.bench.detector {{ARGS}}

# the aggregator's crash-point properties with more crash points than `just test` tries (8)
test-crash-points N="60":
    VIGIL_CRASH_EXAMPLES={{N}} python -m pytest -q tests/integration/test_aggregator_crash_points.py

# the watcher's start-up backlog test at full size: N files (command B runs 20,000)
backlog N="100000":
    VIGIL_BACKLOG_FILES={{N}} python -m pytest -q tests/integration/test_watcher_backlog.py

# chaos: N files while services are SIGKILLed every few seconds, nats-server and PostgreSQL restarted once
chaos N="400" *ARGS:
    python -m tests.chaos.chaos --files {{N}} {{ARGS}}

# analyzer: rules alone and the service's events/s on a backlog; EventClosed -> notification accepted latency (p50/p99)
bench-analyzer *ARGS:
    python -m tests.bench.analyzer {{ARGS}}

# the web UI over 10,000 events: page load p50/p99 per page; and the snapshot cost per event revision
bench-web *ARGS:
    python -m tests.bench.web {{ARGS}}
