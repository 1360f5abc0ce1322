"""The web UI's pages that operate vigil: Services (verdicts; start, stop, restart; live logs), Dead
letters (list, show, retry, purge: services/runtime/dlq_ops.py, as `vigil dlq`), and the HTTP upload
API (services/web/uploads.py)."""

from __future__ import annotations

import json
import time

import msgspec
from aiohttp import web

from proto import printable
from services.health.checks import snapshot
from services.runtime import dlq_ops
from services.web import auth, control, uploads
from services.web.core import NATS_ERRORS, Web, back, json_error, to_json, when


# ---- services ---------------------------------------------------------------------------------------
def bus(state: Web):
    if state.js is None:
        raise web.HTTPServiceUnavailable(text="still connecting to NATS; try again in a moment\n")
    return state.js


async def service_rows(state: Web) -> list[dict]:
    bus(state)
    snap = await snapshot(state.nc, state.config)
    rows = []
    for s in snap.services:
        row = msgspec.structs.asdict(s)
        row["unit_name"] = s.unit or control.unit_of(
            s.service, s.instance if s.service == "detector" and s.unit else None
        )
        rows.append(row)
    return rows


async def services_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    rows = await service_rows(state)
    if request.path.startswith("/api/"):
        return to_json({"services": rows, "supervisor": control.supervisor(state.config)})
    name = "service_rows.html" if request.path.endswith("/rows") else "services.html"
    return state.render(request, name, nav="services", services=rows, supervisor=control.supervisor(state.config))


async def service_action(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    unit, action = request.match_info["unit"], request.match_info["action"]
    try:
        if control.check(unit, action) == "web":  # it ends this very process: say so first, then ask
            await state.audit(request, action, unit, "ok: the web UI restarts itself")
            await control.act(state.config, unit, action, no_block=True)
            raise back(request, "/services", msg=f"{action} {unit}: restarting; reload in a few seconds")
        result = await control.act(state.config, unit, action)
    except (control.NotAllowed, RuntimeError) as exc:
        await state.audit(request, action, unit, f"refused: {exc}")
        raise back(request, "/services", err=f"{action} {unit}: {exc}") from None
    await state.audit(request, action, unit, result)
    raise back(request, "/services", msg=f"{action} {unit}: {result}")


async def logs_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    unit = request.match_info["unit"]
    try:
        control.check(unit, "start")
    except control.NotAllowed as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return state.render(request, "logs.html", nav="services", unit=unit, levels=control.LEVELS, level="info")


async def logs_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the last lines, then each new one (journald, or `vigil up`'s log file)."""
    state: Web = request.app["web"]
    unit = request.match_info["unit"]
    minimum = request.query.get("level", "info")
    try:
        lines = control.follow(state.config, unit)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for line in lines:
            if control.level_ok(line, minimum):
                await resp.write(f"data: {json.dumps(line, default=str)}\n\n".encode())
    except control.NotAllowed as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    except (ConnectionResetError, RuntimeError):
        pass  # the browser went away
    return resp


async def logs_download(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    unit = request.match_info["unit"]
    try:
        lines = [x async for x in control.recent(state.config, unit, 5000)]
        text = "\n".join(
            f"{when(x['time']) if isinstance(x['time'], (int, float)) else x['time'] or ''} {x['level']:7} {x['event']}"
            + "".join(f" {k}={v}" for k, v in x["fields"].items())
            for x in lines
        )
    except control.NotAllowed as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return web.Response(
        text=text + "\n", headers={"Content-Disposition": f"attachment; filename={unit}-{int(time.time())}.log"}
    )


# ---- dead letters -----------------------------------------------------------------------------------
async def dead_letters_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    letters = await dlq_ops.operate(bus(state), state.config, "list", None)
    if request.path.startswith("/api/"):
        return to_json({"dead_letters": letters})
    return state.render(request, "dead_letters.html", nav="dlq", letters=letters)


async def dead_letter_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    try:
        seq = int(request.match_info["seq"])
        letter = await dlq_ops.operate(bus(state), state.config, "show", seq)
    except (ValueError, LookupError) as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return state.render(
        request, "dead_letter.html", nav="dlq", seq=seq, letter=json.dumps(letter, indent=2, default=str)
    )


async def dead_letter_retry(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    seq_text = request.match_info["seq"]
    try:
        result = await dlq_ops.operate(bus(state), state.config, "retry", int(seq_text))
    except (ValueError, LookupError, *NATS_ERRORS) as exc:
        await state.audit(request, "retry", f"dlq:{seq_text}", f"refused: {exc}")
        raise back(request, "/dead-letters", err=str(exc)) from None
    await state.audit(request, "retry", f"dlq:{seq_text}", f"ok: back on {result['subject']}")
    raise back(request, "/dead-letters", msg=f"dead letter {seq_text} is back on {result['subject']}")


async def dead_letters_purge(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    form = await request.post()
    if form.get("confirm") != "yes":
        raise back(request, "/dead-letters", err="tick the box to purge every letter")
    try:
        result = await dlq_ops.operate(bus(state), state.config, "purge", None)
    except NATS_ERRORS as exc:
        await state.audit(request, "purge", "dlq", f"failed: {exc!r}"[:200])
        raise back(request, "/dead-letters", err=f"purge failed: {exc!r}"[:200]) from None
    await state.audit(request, "purge", "dlq", f"ok: {result['purged']} purged")
    raise back(request, "/dead-letters", msg=f"{result['purged']} dead letters purged")


# ---- uploads ----------------------------------------------------------------------------------------
async def upload(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    camera = request.match_info["camera"]
    request["actor"] = f"camera:{printable(camera)[:64]}"
    bearer = request.headers.get("Authorization", "")
    if not bearer.startswith("Bearer "):
        return json_error(401, "unauthorized", "send the camera's token: Authorization: Bearer <token>")
    try:
        # the token first: without it nobody learns which camera names exist
        if not uploads.valid_camera(camera) or not auth.upload_token_ok(camera, bearer.removeprefix("Bearer ")):
            raise uploads.Refused(401, "bad_token", "this token is not the camera's")
        folder = uploads.camera_folder(state.config.media_root, camera)
        w = state.config.watcher
        answer = await uploads.receive(
            request.content,
            folder,
            w.camera_prefix + camera,
            state.cfg.upload_max_bytes,
            request.content_length,
            {e.lower() for e in (*w.image_extensions, *w.clip_extensions)},
        )
    except uploads.Refused as exc:
        if exc.status == 401 and state.audit_once(("upload", state.client(request))):
            await state.audit(request, "upload", printable(camera)[:128], f"refused: {exc.detail}")
        return json_error(exc.status, exc.error, exc.detail)
    return web.json_response(answer, status=202)
