"""Notify targets (secrets from credentials, masked names, refusals at start) and the model analyzer's
reply parsing (good, fenced, malformed, out of range, prose)."""

from __future__ import annotations

import msgspec
import pytest

from services.analyzer.model import ModelFailed, parse_reply
from services.notifier import targets
from services.runtime.config import Config, ConfigError


def config(*urls: str) -> Config:
    return msgspec.convert({"notify": {"rules": [{"name": "porch", "urls": list(urls)}]}}, Config)


def creds(tmp_path, **secrets):
    d = tmp_path / "creds"
    d.mkdir(exist_ok=True)
    for k, v in secrets.items():
        (d / f"notify_{k}").write_text(v)
        (d / f"notify_{k}").chmod(0o600)
    return {"CREDENTIALS_DIRECTORY": str(d)}


def test_secrets_come_from_credentials_and_never_show(tmp_path):
    env = creds(tmp_path, ntfy="s3cr3t-Pa$$")
    found = targets.resolve(config("ntfys://bob:{secret:ntfy}@ntfy.sh/vigil"), env)
    t = found[("porch", 0)]
    assert "s3cr3t" not in t.name and t.name.startswith("ntfys://bob:")
    assert t.secrets == ("s3cr3t-Pa$$",)
    assert t.scrub("auth failed for bob:s3cr3t-Pa$$ (s3cr3t-Pa%24%24)") == "auth failed for bob:*** (***)"


def test_a_missing_secret_or_an_unknown_scheme_stops_the_notifier_naming_it(tmp_path):
    env = creds(tmp_path)
    with pytest.raises(ConfigError, match=r"notify.rules\[0\] \(porch\).urls\[0\]: secret 'ntfy' not found"):
        targets.resolve(config("ntfys://bob:{secret:ntfy}@ntfy.sh/vigil"), env)
    with pytest.raises(ConfigError, match=r"urls\[1\]: Apprise cannot use 'nope://...'"):
        targets.resolve(config("json://127.0.0.1/x", "nope://host/x"), env)


def completion(content: str) -> bytes:
    return msgspec.json.encode({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


def test_a_good_reply_and_a_fenced_one():
    v = parse_reply(
        completion(
            '{"risk_score": 91, "summary": "A person at the door at night.", "factors": [{"name": "person", "points": 60, "detail": "x"}]}'
        )
    )
    assert (v.risk_score, v.summary, v.factors[0].points) == (91, "A person at the door at night.", 60)
    v = parse_reply(completion('```json\n{"risk_score": 5, "summary": "A cat."}\n```'))
    assert (v.risk_score, v.factors) == (5, [])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (completion("I think this is risky."), "does not match the schema"),
        (
            completion('{"risk_score": 150, "summary": "x"}'),
            r"does not match the schema: Expected `int` <= 100 - at `\$.risk_score`",
        ),
        (completion('{"risk_score": "high", "summary": "x"}'), r"Expected `int`, got `str`"),
        (completion('{"risk_score": 50}'), r"missing required field `summary`"),
        (b'{"error": "model not loaded"}', "not a chat completion"),
        (b"<html>502</html>", "not a chat completion"),
    ],
)
def test_nonsense_is_a_failure_with_the_reason(raw, reason):
    with pytest.raises(ModelFailed, match=reason):
        parse_reply(raw)


def test_control_characters_in_a_reply_are_made_printable():
    v = parse_reply(completion('{"risk_score": 5, "summary": "cat\\u001b[31m on the mat"}'))
    assert v.summary == "cat\\x1b[31m on the mat"


def test_what_is_shown_of_a_url_never_holds_its_token(tmp_path):
    assert targets.outline("pover://user@uQiRzpo4DXghDmr9QzzfQu27cmVRsG/{secret:x}") == "pover://..."
    t = targets.resolve(config("json://127.0.0.1/x"), creds(tmp_path))[("porch", 0)]
    assert t.scrub("401 for Authorization: Basic dmlnaWw6aHVudGVyMg== and Bearer sk-abc.def") == (
        "401 for Authorization: Basic *** and Bearer ***"
    )
