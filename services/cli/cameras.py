"""`vigil camera add|list|rotate|remove`: onboarding a camera in one command.

`add NAME` makes the camera's folder under the media root (group vigil, setgid, the default ACL
group:vigil:rwX from services/runtime/acl.py, so any uploader's umask leaves files vigil can read)
and, with --http, its upload token: a credential file `upload/NAME` (0600) in the credential folder
(/etc/vigil/credentials on an appliance, loaded by vigil-web as `upload_NAME`), never the TOML. It
prints what to type into the camera. `rotate` makes a new token (the old one stops working once the
web UI restarts); `remove` deletes the token and, unless --keep-media, the camera's folder and files.

With --ftp (as root, on a box set up by `ops/install.sh --ftp`), also its FTP account: a system user
`vigil-cam-NAME` (no shell, its own group, listed in /etc/vigil/ftp-users: the only accounts vsftpd
lets in), its home the camera's folder (the chroot: root's, not writable by the account, as vsftpd
insists) with the folder `upload/` inside, which the account owns. Its generated password is set with
chpasswd (through a pipe, never an argv) and kept as the credential `ftp/NAME` (0600), never in the
TOML. What the camera needs (server, port, passive mode, TLS, user, password, remote folder) is
printed from /etc/vsftpd.conf itself, so it is what the server does.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from proto.messages import FTP_UPLOAD_FOLDER, valid_camera
from services.runtime import acl
from services.runtime.config import Config, credential_folder
from services.runtime.files import write_secret

TOKEN_FOLDER = "upload"
FTP_FOLDER = "ftp"  # the FTP passwords, in the credential folder
FTP_USERS = Path("/etc/vigil/ftp-users")  # vsftpd's userlist_file (userlist_deny=NO): who may log in
VSFTPD_CONF = Path("/etc/vsftpd.conf")
VSFTPD_MARK = "# vigil camera uploads"  # first line of the vsftpd.conf ops/install.sh --ftp writes


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


def ftp_user(name: str) -> str:
    """The camera's FTP account: lower case only (a portable user name), at most 32 characters."""
    if not re.fullmatch(r"[a-z0-9_-]{1,22}", name):
        raise ValueError(
            f"an FTP account needs a camera name of lower-case letters, digits, '-' and '_', at most 22"
            f" (the account is vigil-cam-NAME): {name!r}"
        )
    return f"vigil-cam-{name}"


def ftp_server() -> dict:
    """What the FTP server set up by `ops/install.sh --ftp` does, read from its own vsftpd.conf."""
    try:
        text = VSFTPD_CONF.read_text()
    except OSError:
        text = ""
    if not text.startswith(VSFTPD_MARK):
        raise LookupError(
            "no FTP server set up by vigil here: run `sudo ops/install.sh --ftp` first (or, for an FTP"
            " server you run yourself, see the README: Add a camera)"
        )
    conf = dict(re.findall(r"^([a-z_0-9]+)=(.*)$", text, re.M))
    addresses = sorted(
        {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1", "127.0.1.1"}
    ) if socket.gethostname() else []  # fmt: skip
    return {
        "server": addresses[0] if addresses else socket.gethostname(),
        "port": int(conf.get("listen_port", "21")),
        "passive_ports": f"{conf.get('pasv_min_port', '?')}-{conf.get('pasv_max_port', '?')}",
        "tls": "required (explicit FTPS, AUTH TLS)" if conf.get("ssl_enable") == "YES" else "none (plain FTP)",
    }


def _ftp_password(user: str, name: str) -> str:
    password = secrets.token_urlsafe(18)  # no ':' (chpasswd's separator) and no newline
    subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True, capture_output=True)
    folder = credential_folder() / FTP_FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    write_secret(folder / name, password)
    return password


def _ftp_users(change) -> None:
    users = {u for u in (FTP_USERS.read_text().split() if FTP_USERS.exists() else []) if u}
    users = change(users)
    write_secret(FTP_USERS, "\n".join(sorted(users)))


def add_ftp(folder: Path, name: str, gid: int) -> dict:
    """The camera's account, its upload folder and its password (root only)."""
    if os.geteuid() != 0:
        raise PermissionError("an FTP account is a system user: run it as root (sudo vigil camera add NAME --ftp)")
    server = ftp_server()
    user = ftp_user(name)
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(folder),
             "--shell", "/usr/sbin/nologin", "--comment", f"vigil camera {name} (FTP uploads)", user],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    account = pwd.getpwnam(user)
    # the chroot: root's, so the account cannot write it (vsftpd refuses a writable chroot); the
    # account's folder inside it, setgid vigil with the default ACL like every camera folder
    os.chown(folder, 0, gid)
    upload = folder / FTP_UPLOAD_FOLDER
    if upload.is_symlink():
        raise ValueError(f"{upload} is a symlink: refused")
    upload.mkdir(mode=0o2770, exist_ok=True)
    os.chown(upload, account.pw_uid, gid)
    os.chmod(upload, 0o2770)
    acl.grant(str(upload), gid)
    _ftp_users(lambda users: users | {user})
    return {
        **server,
        "user": user,
        "password": _ftp_password(user, name),
        "remote_folder": f"/{FTP_UPLOAD_FOLDER}",
        "passive": "on (active mode is refused)",
    }


def remove_ftp(name: str) -> bool:
    user = f"vigil-cam-{name}"
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    _ftp_users(lambda users: users - {user})
    subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)  # its open FTP sessions
    subprocess.run(["userdel", user], check=True, capture_output=True, text=True)
    (credential_folder() / FTP_FOLDER / name).unlink(missing_ok=True)
    return True


def add(config: Config, name: str, http: bool, url: str | None, ftp: bool = False) -> dict:
    folder = _folder(config, name)
    if ftp:
        ftp_user(name)  # refused before anything is made
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
    if ftp:
        out["ftp"] = add_ftp(folder, name, gid)
    if http:
        out["token"] = _write_token(name)
        out["upload_url"] = upload_url(config, name, url)
    return out


def _has_ftp(name: str) -> bool:
    try:
        pwd.getpwnam(f"vigil-cam-{name}")
        return True
    except KeyError:
        return False


def rotate(config: Config, name: str, url: str | None) -> dict:
    """A new HTTP token and a new FTP password, for whichever the camera has."""
    _checked(name)
    out: dict = {"camera": name}
    if _has_ftp(name):
        if os.geteuid() != 0:
            raise PermissionError("a new FTP password needs root (sudo vigil camera rotate NAME)")
        out["ftp"] = {**ftp_server(), "user": f"vigil-cam-{name}", "remote_folder": f"/{FTP_UPLOAD_FOLDER}",
                      "passive": "on (active mode is refused)",
                      "password": _ftp_password(f"vigil-cam-{name}", name)}  # fmt: skip
    if (credential_folder() / TOKEN_FOLDER / name).is_file():
        out["token"] = _write_token(name)
        out["upload_url"] = upload_url(config, name, url)
    if len(out) == 1:
        raise LookupError(
            f"camera {name!r} has no FTP account and no HTTP token to rotate (vigil camera add --ftp/--http)"
        )
    return out


def remove(config: Config, name: str, keep_media: bool) -> dict:
    folder = _folder(config, name)
    token = credential_folder() / TOKEN_FOLDER / name
    had_token = token.is_file()
    token.unlink(missing_ok=True)
    had_ftp = _has_ftp(name)
    if had_ftp:
        if os.geteuid() != 0:
            raise PermissionError("removing an FTP account needs root (sudo vigil camera remove NAME)")
        remove_ftp(name)
    removed = False
    if not keep_media and folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
        removed = True
    return {"camera": name, "token_removed": had_token, "ftp_account_removed": had_ftp, "media_removed": removed}


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
                "ftp_account": f"vigil-cam-{entry.name}" if _has_ftp(entry.name) else None,
            })  # fmt: skip
    return out


def print_listing(rows: list[dict]) -> None:
    from services.cli import render

    render.table(
        "cameras",
        ["camera", "files", "HTTP token", "FTP account"],
        [[r["camera"], r["files"], "yes" if r["http_token"] else "-", r["ftp_account"] or "-"] for r in rows],
    )


def print_done(d: dict) -> None:
    lines = [f"camera {d['camera']}"]
    if "folder" in d:
        lines.append(f"  folder       {d['folder']} (ACL: {d['acl']})")
    if "ftp" in d:
        f = d["ftp"]
        lines += [
            "  FTP upload   (type these into the camera's FTP settings)",
            f"    server         {f['server']}",
            f"    port           {f['port']}",
            f"    passive mode   {f['passive']}; data ports {f['passive_ports']}",
            f"    encryption     {f['tls']}",
            f"    user           {f['user']}",
            f"    password       {f['password']}",
            f"    remote folder  {f['remote_folder']}",
        ]
    if "token" in d:
        lines.append(f"  HTTP upload  POST {d['upload_url']}")
        lines.append(f"               header  Authorization: Bearer {d['token']}")
        lines.append("               (restart the web UI to load it: systemctl restart vigil-web)")
    for k in ("token_removed", "ftp_account_removed", "media_removed"):
        if k in d:
            lines.append(f"  {k.replace('_', ' ')}: {'yes' if d[k] else 'no'}")
    print("\n".join(lines))
