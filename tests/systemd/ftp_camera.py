"""A camera's FTP client, run by the appliance test inside the booted system's network namespace.

    python ftp_camera.py PLAN.json  ->  prints one JSON object: what each step got

A step is {"do": ..., "user": ..., "password": ..., ...}; each connects on its own, in passive mode,
and reports the server's answer or error text (never raises), so the test sees every refusal's words.
Uploads are throttled like a camera on a weak link: `rate` bytes per second, in 1 KiB blocks.
"""

from __future__ import annotations

import ftplib
import io
import json
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


class Throttled(io.RawIOBase):
    def __init__(self, data: bytes, rate: float) -> None:
        self.data, self.rate, self.pos, self.t0 = data, rate, 0, time.monotonic()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.pos : self.pos + min(n if n > 0 else 1024, 1024)]
        self.pos += len(chunk)
        ahead = self.pos / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)
        return chunk


def login(step: dict, tls: bool = False) -> ftplib.FTP:
    ftp = ftplib.FTP_TLS(timeout=30) if tls or step.get("tls") else ftplib.FTP(timeout=30)
    ftp.connect(HOST, 21)
    ftp.login(step["user"], step["password"])
    if isinstance(ftp, ftplib.FTP_TLS):
        ftp.prot_p()
    ftp.set_pasv(not step.get("active"))
    return ftp


def run_step(step: dict) -> dict:
    data = bytes.fromhex(step["hex"]) if "hex" in step else b""
    rate = step.get("rate", 16_384)
    try:
        ftp = login(step)
        out: dict = {"login": "ok"}
        do = step["do"]
        if do == "login":
            pass
        elif do == "stor":  # straight to its name, growing for seconds
            out["reply"] = ftp.storbinary(f"STOR {step['path']}", Throttled(data, rate), blocksize=1024)
        elif do == "rename":  # a temporary name, then RNFR/RNTO
            ftp.storbinary(f"STOR {step['path']}.tmp", Throttled(data, rate), blocksize=1024)
            out["reply"] = ftp.rename(f"{step['path']}.tmp", step["path"])
        elif do == "drop":  # the link goes down mid-file: the socket closes with no ABOR, no QUIT
            conn = ftp.transfercmd(f"STOR {step['path']}")
            cut = int(len(data) * step.get("fraction", 0.4))
            for i in range(0, cut, 1024):
                conn.sendall(data[i : min(i + 1024, cut)])
                time.sleep(1024 / rate)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST
            ftp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            ftp.sock.close()
            return {"login": "ok", "sent": cut}
        elif do == "appe":  # reconnect and append what the server does not have yet
            ftp.voidcmd("TYPE I")
            have = ftp.size(step["path"]) or 0
            out["had"] = have
            out["reply"] = ftp.storbinary(f"APPE {step['path']}", Throttled(data[have:], rate), blocksize=1024)
        elif do == "list":
            out["names"] = sorted(ftp.nlst(step.get("path", "/")))
        elif do == "cwd":
            out["reply"] = ftp.cwd(step["path"])
            out["pwd"] = ftp.pwd()
        elif do == "retr":
            got = io.BytesIO()
            out["reply"] = ftp.retrbinary(f"RETR {step['path']}", got.write)
            out["bytes"] = len(got.getvalue())
        elif do == "mkd":
            out["reply"] = ftp.mkd(step["path"])
        with_quit(ftp)
        return out
    except (ftplib.Error, OSError, EOFError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def with_quit(ftp: ftplib.FTP) -> None:
    try:
        ftp.quit()
    except (ftplib.Error, OSError, EOFError):
        ftp.close()


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    results: dict = {}
    # each group's steps run at once (several cameras, or one camera's parallel uploads); groups in turn
    for group in plan:
        threads = []
        for name, step in group.items():

            def go(name=name, step=step) -> None:
                results[name] = run_step(step)

            threads.append(threading.Thread(target=go))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
