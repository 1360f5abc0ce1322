"""POSIX ACLs on the media root, so that any FTP server with any umask writes files vigil can read.

vsftpd's default `local_umask=077` writes uploads 0600, owned by the FTP user: the setgid group
`vigil` on the folder is then worth nothing, and the watcher (another user, group vigil) cannot read
a single one. A *default* ACL `group:vigil:rwX` on every folder makes the kernel give each new file
and folder that entry whatever the writer's umask; an *access* ACL with the same entry fixes what is
there already. Written as the kernel's own xattrs (`system.posix_acl_default` / `_access`): no
dependency on the `acl` package's setfacl on the box.

    python -m services.runtime.acl MEDIA_ROOT GROUP     (ops/install.sh: at install and at every upgrade)
"""

from __future__ import annotations

import grp
import os
import stat
import struct
import sys

_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
DEFAULT, ACCESS = "system.posix_acl_default", "system.posix_acl_access"


def encode(entries: list[tuple[int, int, int]]) -> bytes:
    """(tag, perm, id) entries, in the order the kernel wants (by tag, then id)."""
    return struct.pack("<I", _VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in sorted(entries, key=lambda e: (e[0], e[2]))
    )


def decode(raw: bytes) -> list[tuple[int, int, int]]:
    (version,) = struct.unpack_from("<I", raw)
    if version != _VERSION:
        raise ValueError(f"ACL xattr version {version}")
    return [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]


def _bits(mode: int, shift: int) -> int:
    return (mode >> shift) & 7


def group_entries(mode: int, gid: int, perm: int) -> list[tuple[int, int, int]]:
    """`mode`'s owner, group and other bits, plus group `gid` with `perm`; the mask lets both groups'
    bits through (the mask is what `ls -l` then shows as the group bits)."""
    group_obj = _bits(mode, 3)
    return [
        (USER_OBJ, _bits(mode, 6), _UNDEFINED),
        (GROUP_OBJ, group_obj, _UNDEFINED),
        (GROUP, perm, gid),
        (MASK, group_obj | perm, _UNDEFINED),
        (OTHER, _bits(mode, 0), _UNDEFINED),
    ]


def grant(path: str, gid: int) -> None:
    """One path: a folder gets the default ACL (and rwx for the group), a file read and write."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return  # never through a symlink
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            grant_fd(fd, gid)
        finally:
            os.close(fd)
    elif stat.S_ISREG(st.st_mode):
        os.setxattr(path, ACCESS, encode(group_entries(st.st_mode, gid, 6)), follow_symlinks=False)


def grant_fd(fd: int, gid: int) -> None:
    """A folder, through its open fd (never a path a symlink could be swapped into): the default ACL,
    and rwx for the group."""
    mode = os.fstat(fd).st_mode
    os.setxattr(fd, DEFAULT, encode(group_entries(mode, gid, 7)))
    os.setxattr(fd, ACCESS, encode(group_entries(mode, gid, 7)))


def grant_tree(root: str, group: str) -> int:
    """The media root and everything under it (no symlink followed); returns how many paths."""
    gid = grp.getgrnam(group).gr_gid
    n = 0
    grant(root, gid)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            grant(os.path.join(dirpath, name), gid)
            n += 1
    return n + 1


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        n = grant_tree(args[0], args[1])
    except OSError as exc:  # a filesystem without ACLs (some FUSE, NFS without them): say so, do not fail
        print(
            f"could not set ACLs under {args[0]}: {exc.strerror}; files written 0600 stay unreadable", file=sys.stderr
        )
        return 1
    print(f"default ACL group:{args[1]}:rwX on {n} paths under {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
