"""`vigil camera add|list|rotate|remove`: onboarding a camera in one command.

`add NAME` makes the camera's folder under the media root (group vigil, setgid, the default ACL
group:vigil:rwX from services/runtime/acl.py, so any uploader's umask leaves files vigil can read)
and, with --http, its upload token: a credential file `upload/NAME` (0600) in the credential folder
(/etc/vigil/credentials on an appliance, loaded by vigil-web as `upload_NAME`), never the TOML. It
prints what to type into the camera. `rotate` makes a new token (the old one stops working once the
web UI restarts); `remove` deletes the token and, unless --keep-media, the camera's folder and files.
(FTP accounts come with `install.sh --ftp`: issue 18's next step.)
"""

from __future__ import annotations

import grp
import os
import secrets
import shutil
from pathlib import Path

from proto.messages import valid_camera
from services.runtime import acl
from services.runtime.config import Config, credential_folder
from services.runtime.files import write_secret

TOKEN_FOLDER = "upload"


def _checked(name: str) -> str:
    if not valid_camera(name):
        raise ValueError(f"{name!r} is not a camera name: letters, digits, '-' and '_' (at most 128)")
    return name


def _folder(config: Config, name: str) -> Path:
    return Path(config.media_root) / _checked(name)


def upload_url(config: Config, name: str, url: str | None) -> str:
    base = (url or f"http://{config.web.http_host}:{config.web.http_port}").rstrip("/")
    return f"{base}/api/v1/uploads/{name}"


def _write_token(name: str) -> str:
    folder = credential_folder() / TOKEN_FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(24)
    write_secret(folder / name, token)
    return token


def add(config: Config, name: str, http: bool, url: str | None) -> dict:
    folder = _folder(config, name)
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symlink: refused")
    folder.mkdir(mode=0o2775, exist_ok=True)
    os.chmod(folder, 0o2775)
    try:
        gid = grp.getgrnam("vigil").gr_gid
        os.chown(folder, -1, gid)
    except (KeyError, PermissionError):
        gid = os.stat(folder).st_gid  # no vigil group here (a development box): the folder's own
    try:
        acl.grant(str(folder), gid)
        acls = "group vigil rwX, default for new files"
    except OSError as exc:
        acls = f"none ({exc.strerror}): uploads must be written group-readable"
    out = {"camera": name, "folder": str(folder), "acl": acls}
    if http:
        out["token"] = _write_token(name)
        out["upload_url"] = upload_url(config, name, url)
    return out


def rotate(config: Config, name: str, url: str | None) -> dict:
    _checked(name)
    if not (credential_folder() / TOKEN_FOLDER / name).is_file():
        raise LookupError(f"camera {name!r} has no HTTP token to rotate (vigil camera add {name} --http)")
    return {"camera": name, "token": _write_token(name), "upload_url": upload_url(config, name, url)}


def remove(config: Config, name: str, keep_media: bool) -> dict:
    folder = _folder(config, name)
    token = credential_folder() / TOKEN_FOLDER / name
    had_token = token.is_file()
    token.unlink(missing_ok=True)
    removed = False
    if not keep_media and folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
        removed = True
    return {"camera": name, "token_removed": had_token, "media_removed": removed}


def listing(config: Config) -> list[dict]:
    root = Path(config.media_root)
    tokens = credential_folder() / TOKEN_FOLDER if os.environ.get("CREDENTIALS_DIRECTORY") else None
    out = []
    for entry in sorted(root.iterdir() if root.is_dir() else [], key=lambda p: p.name):
        if entry.is_dir() and not entry.is_symlink() and valid_camera(entry.name):
            files = sum(1 for p in entry.rglob("*") if p.is_file())
            out.append({
                "camera": entry.name,
                "files": files,
                "http_token": bool(tokens and (tokens / entry.name).is_file()),
            })  # fmt: skip
    return out


def print_listing(rows: list[dict]) -> None:
    from services.cli import render

    render.table(
        "cameras",
        ["camera", "files", "HTTP token"],
        [[r["camera"], r["files"], "yes" if r["http_token"] else "-"] for r in rows],
    )


def print_done(d: dict) -> None:
    lines = [f"camera {d['camera']}"]
    if "folder" in d:
        lines.append(f"  folder       {d['folder']} (ACL: {d['acl']})")
        lines.append("  FTP          point the camera's FTP upload at this folder (install.sh --ftp: coming)")
    if "token" in d:
        lines.append(f"  HTTP upload  POST {d['upload_url']}")
        lines.append(f"               header  Authorization: Bearer {d['token']}")
        lines.append("               (restart the web UI to load it: systemctl restart vigil-web)")
    for k in ("token_removed", "media_removed"):
        if k in d:
            lines.append(f"  {k.replace('_', ' ')}: {'yes' if d[k] else 'no'}")
    print("\n".join(lines))
