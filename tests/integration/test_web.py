"""The web service as a real process against a real PostgreSQL and nats-server, with the pipeline behind
it (model "synthetic": a whole-frame person in every frame, so every upload makes an event, an analysis
and a snapshot): every refusal of the login, the session, CSRF and the upload API; an upload recorded
like an FTP one; reviewed, keep and notes persisting and escaped; the audit trail; the JSON API; a
corrupt upload's dead letter shown and retried; the Services page's refusal without a supervisor."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import aiohttp
import pytest

from services.cli.stack import free_port
from services.web.auth import hash_password
from tests.support import REPO, photo_bytes, query, vigil_json, wait_until, wait_until_async

PIPELINE = ("watcher", "detector", "aggregator", "recorder", "analyzer")
PASSWORD = "correct horse battery staple"
TOKEN = "front-door-token-0123456789"


@pytest.fixture
def web_stack(make_stack, tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    for name, value in {
        "web-password": hash_password(PASSWORD),
        "upload_front_door": TOKEN,
        "web-api-token": "api-token-for-scripts",
    }.items():
        (creds / name).write_text(value + "\n")
        (creds / name).chmod(0o600)
    port = free_port()
    stack = make_stack(
        model="synthetic",
        env={"CREDENTIALS_DIRECTORY": str(creds), "VIGIL_HEARTBEAT_SECONDS": "1"},
        web={"http_port": port, "login_attempts": 3, "upload_max_bytes": 2_000_000},
        aggregator={"idle_seconds": 1.0, "max_seconds": 20.0},
    )
    old = os.umask(0o077)  # the units' UMask=0077: an upload must still be readable by group vigil
    try:
        stack.start(*PIPELINE, "web")
    finally:
        os.umask(old)
    stack.wait_ready(*PIPELINE, "web", timeout=60)
    wait_until(lambda: '"event": "serving"' in stack.log("web"), what="the web UI serving (schema migrated)")
    stack.url = f"http://127.0.0.1:{port}"
    return stack


def client(**kw) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kw)


async def login(session: aiohttp.ClientSession, url: str, password: str = PASSWORD) -> aiohttp.ClientResponse:
    async with session.get(f"{url}/login") as r:
        token = re.search(r'name="login_csrf" value="([^"]+)"', await r.text()).group(1)
    return await session.post(
        f"{url}/login",
        data={"login_csrf": token, "username": "admin", "password": password, "next": "/events"},
        allow_redirects=False,
    )


async def csrf_of(session: aiohttp.ClientSession, url: str, page: str = "/events") -> str:
    async with session.get(url + page) as r:
        return re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)


async def upload(url: str, body: bytes, camera: str = "front_door", token: str | None = TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/v1/uploads/{camera}", data=body, headers=headers) as r:
        return r.status, await r.json()


async def test_every_refusal_then_an_operators_session(web_stack, database):
    url = web_stack.url
    async with client() as s:
        # nothing without a session: pages go to the login, the API says 401, writes go nowhere
        async with s.get(f"{url}/events", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/login?next=")
        async with s.get(f"{url}/api/v1/events") as r:
            assert r.status == 401 and (await r.json())["error"] == "unauthorized"
        async with s.post(f"{url}/dead-letters/purge", data={"confirm": "yes"}, allow_redirects=False) as r:
            assert r.status == 303 and "/login" in r.headers["Location"]
        # a login form posted without its own CSRF cookie (a cross-site form) is refused
        async with (
            aiohttp.ClientSession() as bare,
            bare.post(f"{url}/login", data={"login_csrf": "x", "username": "admin", "password": PASSWORD}) as r,
        ):
            assert r.status == 403
        # a message in a link is not the server's: never shown (a forged "session hijacked, call ...")
        async with s.get(f"{url}/login?err=Your+session+was+hijacked&msg=call+555") as r:
            page = await r.text()
            assert "hijacked" not in page and "555" not in page
        # six wrong passwords at once, the limit three: three answered 401, three 429 (a try counts
        # before bcrypt runs, so a burst cannot outrun the limit); then even the right one waits
        answers = await asyncio.gather(*(login(s, url, "wrong") for _ in range(6)))
        assert sorted(r.status for r in answers) == [401] * 3 + [429] * 3, [r.status for r in answers]
        r = await login(s, url)
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0
    failed = query(database, "SELECT action, result FROM audit_log WHERE starts_with(action, 'login') ORDER BY id")
    assert sorted(a for a, _ in failed) == ["login_failed"] * 3 + ["login_refused"], failed  # refusals: one a minute

    # the API token reads (and only reads)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer api-token-for-scripts"}) as s:
        async with s.get(f"{url}/api/v1/events") as r:
            assert r.status == 200 and "events" in await r.json()
        async with s.get(f"{url}/api/v1/events", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401


async def test_uploads_events_review_audit_and_dead_letters(web_stack, database, media):
    url = web_stack.url
    # the upload API's refusals, each with its JSON error
    assert (await upload(url, photo_bytes("astronaut", scale=0.3), token=None))[0] == 401
    assert (await upload(url, photo_bytes("astronaut", scale=0.3), token="wrong"))[1]["error"] == "bad_token"
    # a camera without a token is told nothing more than a wrong token is (no probing for names)
    assert (await upload(url, photo_bytes("astronaut", scale=0.3), camera="nowhere"))[1]["error"] == "bad_token"
    assert (await upload(url, photo_bytes("astronaut", scale=0.3), camera="..%2Fetc"))[0] == 401
    status, answer = await upload(url, b"#!/bin/sh\nrm -rf /\n")
    assert (status, answer["error"]) == (415, "not_media")
    status, answer = await upload(url, b"\xff\xd8\xff" + b"\0" * 2_100_000)
    assert (status, answer["error"]) == (413, "too_large")
    cut = photo_bytes("astronaut", scale=0.3)
    status, answer = await upload(url, cut[: len(cut) // 2])  # a camera's encoder stopped half-way
    assert (status, answer["error"]) == (422, "incomplete") and "JPEG without its end marker" in answer["detail"]
    assert sorted(p.name for p in (media / "front_door").iterdir()) == []  # nothing refused was kept, no temp file

    status, answer = await upload(url, photo_bytes("astronaut", scale=0.3))
    assert status == 202 and answer["path"].startswith("front_door/")
    assert oct((media / answer["path"]).stat().st_mode & 0o777) == "0o640"  # whatever the service's umask
    # recorded exactly like an FTP upload, under the id the API answered
    wait_until(
        lambda: query(database, "SELECT 1 FROM detections WHERE file_id = %s", answer["file_id"]),
        what="upload recorded",
    )
    wait_until(lambda: query(database, "SELECT snapshot FROM event_analysis WHERE snapshot IS NOT NULL"), what="snap")
    (event_id,) = query(database, "SELECT event_id FROM events")[0]

    async with client() as s:
        r = await login(s, url)
        assert r.status == 303 and r.headers["Location"] == "/events"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        async with s.get(f"{url}/events") as r:
            page = await r.text()
            assert r.status == 200 and f"/events/{event_id}/thumb.jpg" in page
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with s.get(f"{url}/events/{event_id}/thumb.jpg") as r:
            assert r.status == 200 and (await r.read())[:3] == b"\xff\xd8\xff"
        async with s.get(f"{url}/events?camera=backyard") as r:
            assert f"/events/{event_id}" not in await r.text()  # the filter filters
        csrf = await csrf_of(s, url)
        # writes without the token, with a wrong one, or from another site's page: 403, nothing changed
        for data, headers in (
            ({"value": "1"}, {}),
            ({"value": "1", "csrf": "forged"}, {}),
            ({"value": "1", "csrf": csrf}, {"Origin": "http://evil.example"}),
        ):
            async with s.post(f"{url}/events/{event_id}/reviewed", data=data, headers=headers) as r:
                assert r.status == 403
        assert query(database, "SELECT reviewed FROM events")[0] == (False,)
        async with s.post(f"{url}/events/{event_id}/reviewed", data={"value": "1", "csrf": csrf}) as r:
            assert r.status == 200 and "Reviewed" in await r.text()
        hostile = '<script>alert("x")</script>'
        async with s.post(f"{url}/events/{event_id}/notes", data={"notes": hostile, "csrf": csrf}) as r:
            text = await r.text()
            assert hostile not in text and "&lt;script&gt;" in text
        async with s.get(f"{url}/api/v1/events/{event_id}") as r:
            got = await r.json()
            assert got["reviewed"] is True and got["notes"] == hostile and got["detections"]
        async with s.post(f"{url}/events/{event_id}/keep", data={"value": "1", "csrf": csrf}) as r:
            assert r.status == 200
        async with s.get(f"{url}/media/{got['detections'][0]['detection_id']}") as r:
            assert r.status == 200 and (await r.read())[:3] == b"\xff\xd8\xff"
            assert "attachment" in r.headers["Content-Disposition"]

        # a corrupt upload: a JPEG with nothing between its header and its end, dead-lettered by the detector
        status, bad = await upload(url, b"\xff\xd8\xff\xe0" + b"\0" * 64 + b"\xff\xd9")
        assert status == 202

        async def letters():
            async with s.get(f"{url}/api/v1/dead-letters") as r:
                return [d for d in (await r.json())["dead_letters"] if d["path"] == bad["path"]]

        (letter,) = await wait_until_async(letters, what="the corrupt upload's dead letter")
        async with s.get(f"{url}/dead-letters") as r:
            assert bad["path"] in await r.text()
        async with s.post(f"{url}/dead-letters/{letter['seq']}/retry", data={"csrf": csrf}) as r:
            assert r.status == 200 and "is back on vigil.uploads.front_door" in await r.text()
        # retried, the detector refuses it again: a new letter, which a purge (ticked) then removes
        await wait_until_async(letters, what="the retried upload dead-lettered again")
        async with s.post(f"{url}/dead-letters/purge", data={"csrf": csrf}) as r:
            assert "tick the box" in await r.text()
        async with s.post(f"{url}/dead-letters/purge", data={"csrf": csrf, "confirm": "yes"}) as r:
            assert re.search(r"\d+ dead letters purged", await r.text())
        assert await letters() == []
        # the cameras page: the upload's camera, its latest thumbnail, today's counts
        async with s.get(f"{url}/api/v1/cameras") as r:
            cams = {c["camera"]: c for c in (await r.json())["cameras"]}
            assert cams["front_door"]["events_today"] >= 1 and cams["front_door"]["latest_event"] == event_id
        # the Services page: every service's verdict; no supervisor to act through here, said so
        async with s.get(f"{url}/api/v1/services") as r:
            services = (await r.json())["services"]
            assert {x["service"] for x in services} >= {*PIPELINE, "web"}
        async with s.post(f"{url}/services/vigil-detector.service/stop", data={"csrf": csrf}) as r:
            assert "no supervisor" in await r.text()
        async with s.post(f"{url}/services/vigil-nats.service/stop", data={"csrf": csrf}) as r:
            assert "is not a vigil service unit" in await r.text()
        async with s.get(f"{url}/audit") as r:
            page = await r.text()
        # logging out ends the session on the server: the old cookie opens nothing afterwards
        stolen = {c.key: c.value for c in s.cookie_jar}["vigil_session"]
        async with s.post(f"{url}/logout", data={"csrf": csrf}) as r:
            assert r.status == 200 and "/login" in str(r.url)
    async with aiohttp.ClientSession() as replay:  # the cookie by hand: a jar would not send it to an IP address
        async with replay.get(f"{url}/api/v1/events", headers={"Cookie": f"vigil_session={stolen}"}) as r:
            assert r.status == 401
        async with replay.get(f"{url}/api/v1/events", headers={"Cookie": f"vigil_session={stolen}x"}) as r:
            assert r.status == 401
    # the CLI's actions go into the same trail, as cli:<unix user>
    for argv in (["events", "unreviewed", event_id], ["service", "stop", "detector"]):
        subprocess.run(
            [sys.executable, "-m", "services.cli.main", *argv, "--config", str(web_stack.config), "--json"],
            capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ, "VIGIL_CONFIG": ""},
        )  # fmt: skip
    cli = query(database, "SELECT actor, action, target, result FROM audit_log WHERE via = 'cli' ORDER BY id")
    assert [(a, t) for _, a, t, _ in cli] == [("unreviewed", event_id), ("stop", "vigil-detector.service")], cli
    assert cli[0][0].startswith("cli:") and cli[1][3].startswith("refused: no supervisor"), cli
    assert query(database, "SELECT reviewed FROM events") == [(False,)]
    entries = query(database, "SELECT actor, via, action, target, result FROM audit_log WHERE via <> 'cli' ORDER BY id")
    actions = [e[2] for e in entries]
    # the bad token first (an upload refused is an attempt someone made), then the operator's session
    assert entries[0][1:3] == ("api", "upload") and entries[0][4].startswith("refused"), entries[0]
    assert actions[1] == "login" and {"reviewed", "notes", "keep", "retry", "purge", "stop", "logout"} <= set(
        actions
    ), actions
    assert all(e[0] == "admin" for e in entries[1:]), entries
    assert "retry" in page and "dlq:" in page


def vigil_cli(stack, *argv: str) -> dict | list:
    return vigil_json(stack.config, *argv, env={"CREDENTIALS_DIRECTORY": stack.env["CREDENTIALS_DIRECTORY"]})


async def test_a_camera_onboarded_with_its_http_token_uploads_and_is_recorded(web_stack, database, media):
    """`vigil camera add porch --http`: its folder (with the default ACL) and a token the web UI takes
    once restarted; `rotate` retires the old token; `remove` takes token and media."""
    url = web_stack.url
    added = vigil_cli(web_stack, "camera", "add", "porch", "--http", "--url", url)
    assert (media / "porch").is_dir() and (media / "porch").stat().st_mode & 0o2070 == 0o2070
    assert added["upload_url"] == f"{url}/api/v1/uploads/porch" and len(added["token"]) >= 32
    creds = web_stack.env["CREDENTIALS_DIRECTORY"]
    assert oct(os.stat(f"{creds}/upload/porch").st_mode & 0o777) == "0o600"

    def restart_web():
        web_stack.stop("web")
        web_stack.start("web")
        wait_until(lambda: web_stack.log("web").count('"event": "serving"') >= 2 + restart_web.n, what="web again")
        restart_web.n += 1

    restart_web.n = 0
    restart_web()  # the unit loads its credentials at start
    status, answer = await upload(url, photo_bytes("camera", scale=0.3), camera="porch", token=added["token"])
    assert status == 202, answer
    wait_until(
        lambda: query(database, "SELECT 1 FROM detections WHERE file_id = %s", answer["file_id"]), what="recorded"
    )
    listed = {c["camera"]: c for c in vigil_cli(web_stack, "camera", "list")}
    assert listed["porch"]["http_token"] and listed["porch"]["files"] == 1 and not listed["front_door"]["http_token"]

    rotated = vigil_cli(web_stack, "camera", "rotate", "porch")
    restart_web()
    assert (await upload(url, photo_bytes("camera", scale=0.3), camera="porch", token=added["token"]))[0] == 401
    assert (await upload(url, photo_bytes("camera", scale=0.31), camera="porch", token=rotated["token"]))[0] == 202

    assert vigil_cli(web_stack, "camera", "remove", "porch") == {
        "camera": "porch",
        "token_removed": True,
        "ftp_account_removed": False,
        "media_removed": True,
    }
    assert not (media / "porch").exists() and not os.path.exists(f"{creds}/upload/porch")
    audit = [a for (a,) in query(database, "SELECT action FROM audit_log WHERE via = 'cli' ORDER BY id")]
    assert audit == ["camera_add", "camera_rotate", "camera_remove"], audit
