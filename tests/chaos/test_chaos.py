"""The chaos run at a small size, inside command B (`just chaos N` runs a large one)."""

from __future__ import annotations

from tests.chaos.chaos import check, run


def test_kills_and_restarts_lose_and_duplicate_nothing(tmp_path, models_dir):
    result = run(tmp_path / "chaos", models_dir, files=60, seed=11, kill_every=2.0, rate=4.0)
    print({k: v for k, v in result.items() if k not in ("lost",)})  # the figures, in the test log (-s)
    assert all(n >= 1 for n in result["kills"].values()), result["kills"]  # each service killed at least once
    assert result["restarts"] == {"nats-server": 1, "postgresql": 1}
    assert check(result) == []
