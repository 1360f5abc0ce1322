"""Fixtures: a real PostgreSQL per session (a fresh database per test), a real nats-server with
JetStream per test, temporary media/state folders, and the service processes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from services.cli.stack import NatsServer, Postgres
from tests.support import Services, find_models_dir, write_config

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg")
    pg = Postgres(root / "data", log_file=root / "postgres.log").start()
    yield pg
    pg.stop()


@pytest.fixture
def database(postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL; returns its DSN."""
    return postgres.create_database(f"vigil_test_{next(_db_counter)}")


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats-server.log").start()
    yield server
    server.kill()


@pytest.fixture
def media(tmp_path) -> Path:
    root = tmp_path / "media"
    for cam in ("front_door", "backyard"):
        (root / cam).mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def models_dir() -> Path:
    found = find_models_dir()
    if found is None:
        pytest.skip("yolox_nano.onnx not found: set VIGIL_MODELS_DIR (CI uses ../shared/models)")
    return found


@pytest.fixture
def make_stack(tmp_path, media, nats_server, database):
    """Factory: write a config and return a Services handle; every process is stopped afterwards."""
    created: list[Services] = []

    def make(
        model: str = "none", models: Path | None = None, env: dict[str, str] | None = None, **sections
    ) -> Services:
        config = write_config(
            tmp_path / "vigil.toml",
            media=media,
            state=tmp_path / "state",
            nats_url=nats_server.url,
            dsn=database,
            model=model,
            models_dir=models,
            **sections,
        )
        services = Services(config, tmp_path / "logs", env)
        created.append(services)
        return services

    yield make
    for services in created:
        services.stop_all()
