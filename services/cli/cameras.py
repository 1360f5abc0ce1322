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

import contextlib
import fcntl
import grp
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
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


def _account(name: str) -> str:
    """The system user of a camera's FTP account (uninstall.sh removes every `vigil-cam-*`)."""
    return f"vigil-cam-{name}"


def ftp_user(name: str) -> str:
    """The camera's FTP account, for a new one: lower case only (a portable user name), at most 32
    characters."""
    if not re.fullmatch(r"[a-z0-9_-]{1,22}", name):
        raise ValueError(
            f"an FTP account needs a camera name of lower-case letters, digits, '-' and '_', at most 22"
            f" (the account is vigil-cam-NAME): {name!r}"
        )
    return _account(name)


def _this_address() -> str:
    """The address a camera on the LAN reaches this box at: the source address of the default route
    (a UDP socket's connect sends nothing), else a non-loopback address of the host name, else the name
    (Debian maps the host name to 127.0.1.1, which no camera can use)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only looked up in the table
        return s.getsockname()[0]
    with contextlib.suppress(OSError):
        found = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        for address in sorted(found):
            if not address.startswith("127."):
                return address
    return socket.gethostname()


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
    return {
        "server": _this_address(),
        "port": int(conf.get("listen_port", "21")),
        "passive": "on (active mode is refused)",
        "passive_ports": f"{conf.get('pasv_min_port', '?')}-{conf.get('pasv_max_port', '?')}",
        "tls": "required (explicit FTPS, AUTH TLS)" if conf.get("ssl_enable") == "YES" else "none (plain FTP)",
        "remote_folder": f"/{FTP_UPLOAD_FOLDER}",
    }


def _ftp_password(user: str, name: str) -> str:
    password = secrets.token_urlsafe(18)  # no ':' (chpasswd's separator) and no newline
    subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True, capture_output=True)
    folder = credential_folder() / FTP_FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    write_secret(folder / name, password)
    return password


def _ftp_users(change) -> None:
    """Rewrite the list of who may log in, under a lock (two `camera add` at once lose no one)."""
    with open(FTP_USERS.with_name(".ftp-users.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users = {u for u in (FTP_USERS.read_text().split() if FTP_USERS.exists() else []) if u}
        write_secret(FTP_USERS, "\n".join(sorted(change(users))))


def _open_folder(parent_fd: int, name: str) -> int:
    """Folder `name` in `parent_fd`, never through a symlink."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file
        raise ValueError(f"{name} is not a folder ({exc.strerror}): refused") from None


def _own_folder(parent_fd: int, name: str, mode: int, uid: int, gid: int) -> int:
    """Make (or take) folder `name` in `parent_fd` and set its owner, mode and ACL through its own fd,
    never through a path: the media root is writable by group vigil, and root must not be led by a
    symlink swapped in meanwhile to chown or chmod something else. The fd is the caller's to close."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent_fd)
    fd = _open_folder(parent_fd, name)
    try:
        try:
            os.fchown(fd, uid, gid)
        except PermissionError:
            if uid != -1:
                raise
        gid = os.fstat(fd).st_gid  # group vigil, or (no such group, or no right to give it) its own
        os.fchmod(fd, mode)
        acl.grant_fd(fd, gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def add_ftp(folder_fd: int, folder: Path, name: str, gid: int, server: dict) -> dict:
    """The camera's account, its upload folder and its password (root; the checks are done)."""
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
    # the chroot is root's, so the account cannot write it (vsftpd refuses a writable chroot); the
    # account's own folder inside it, setgid vigil with the default ACL like every camera folder
    os.fchown(folder_fd, 0, gid)
    os.close(_own_folder(folder_fd, FTP_UPLOAD_FOLDER, 0o2770, account.pw_uid, gid))
    _ftp_users(lambda users: users | {user})
    return {**server, "user": user, "password": _ftp_password(user, name)}


def remove_ftp(name: str, folder: Path | None) -> bool:
    """The account goes (its sessions first); a kept upload folder is given to root, so the freed uid,
    which a later system user may get, owns nothing of the camera's."""
    user = _account(name)
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return False
    _ftp_users(lambda users: users - {user})
    for _ in range(50):  # its open FTP sessions: killed, and gone before userdel (which refuses a busy user)
        if subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True).returncode == 1:
            break  # none left
        time.sleep(0.1)
    subprocess.run(["userdel", user], check=True, capture_output=True, text=True)
    (credential_folder() / FTP_FOLDER / name).unlink(missing_ok=True)
    if folder is not None and (folder / FTP_UPLOAD_FOLDER).is_dir():
        for dirpath, dirnames, filenames in os.walk(folder / FTP_UPLOAD_FOLDER, followlinks=False):
            for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                with contextlib.suppress(OSError):
                    if os.lstat(entry).st_uid == uid:
                        os.lchown(entry, 0, -1)
    return True


def add(config: Config, name: str, http: bool, url: str | None, ftp: bool = False) -> dict:
    folder = _folder(config, name)
    server: dict = {}
    if ftp:  # every refusal before anything is made
        ftp_user(name)
        if os.geteuid() != 0:
            raise PermissionError("an FTP account is a system user: run it as root (sudo vigil camera add NAME --ftp)")
        server = ftp_server()
    try:
        gid = grp.getgrnam("vigil").gr_gid
    except KeyError:
        gid = -1  # no vigil group here (a development box): the folder keeps its own
    root_fd = os.open(config.media_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fd = _own_folder(root_fd, name, 0o2775, -1, gid)
            acls = "group vigil rwX, default for new files"
        except PermissionError:  # not root, not the owner: the folder as it is
            fd = _open_folder(root_fd, name)
            acls = "unchanged (not root)"
        except OSError as exc:
            if ftp:
                raise ValueError(
                    f"no ACLs on {config.media_root}'s filesystem ({exc.strerror}): vsftpd's camera files"
                    " would not be readable by vigil; put the media root on ext4, xfs or btrfs"
                ) from None
            fd = _open_folder(root_fd, name)
            acls = f"none ({exc.strerror}): uploads must be written group-readable"
        try:
            out: dict = {"camera": name, "folder": str(folder), "acl": acls}
            if ftp:
                out["ftp"] = add_ftp(fd, folder, name, os.fstat(fd).st_gid, server)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)
    if http:
        out["token"] = _write_token(name)
        out["upload_url"] = upload_url(config, name, url)
    return out


def _has_ftp(name: str) -> bool:
    try:
        pwd.getpwnam(_account(name))
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
        user = _account(name)
        out["ftp"] = {**ftp_server(), "user": user, "password": _ftp_password(user, name)}
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
        remove_ftp(name, folder if keep_media else None)
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
                "ftp_account": _account(entry.name) if _has_ftp(entry.name) else None,
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
