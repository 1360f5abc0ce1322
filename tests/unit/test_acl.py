"""The media root's default ACL (services/runtime/acl.py), as the kernel applies it: a file written
with umask 077 into a folder that has it still grants group vigil read (and write), a folder made
inside inherits it, files already there get the entry, symlinks are never followed."""

from __future__ import annotations

import grp
import os

import pytest

from services.runtime import acl


def entries(path, which=acl.ACCESS) -> dict[tuple[int, int], int]:
    return {(tag, ident): perm for tag, perm, ident in acl.decode(os.getxattr(path, which, follow_symlinks=False))}


@pytest.fixture
def group():
    gid = os.getgid()
    return grp.getgrgid(gid).gr_name, gid


def test_whatever_the_umask_the_group_can_read(tmp_path, group):
    name, gid = group
    root = tmp_path / "media"
    (root / "cam").mkdir(parents=True)
    (root / "cam" / "old.jpg").write_bytes(b"x")
    (root / "cam" / "old.jpg").chmod(0o600)
    os.symlink("/etc/passwd", root / "cam" / "link")
    try:
        assert acl.grant_tree(str(root), name) == 4
    except OSError as exc:
        pytest.skip(f"this filesystem has no ACLs: {exc}")
    assert entries(root / "cam" / "old.jpg")[(acl.GROUP, gid)] == 6  # what was there already
    assert entries(root / "cam", acl.DEFAULT)[(acl.GROUP, gid)] == 7
    old = os.umask(0o077)  # vsftpd's local_umask
    try:
        fd = os.open(root / "cam" / "new.jpg", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        (root / "cam" / "2026").mkdir()
    finally:
        os.umask(old)
    new = entries(root / "cam" / "new.jpg")
    assert new[(acl.GROUP, gid)] & 4 and new[(acl.MASK, 0xFFFFFFFF)] & 4  # readable by the group, mask included
    assert (root / "cam" / "new.jpg").stat().st_mode & 0o060 == 0o060  # the umask did not apply
    assert entries(root / "cam" / "2026", acl.DEFAULT)[(acl.GROUP, gid)] == 7  # inherited by new folders
    with pytest.raises(OSError):
        os.getxattr(root / "cam" / "link", acl.ACCESS, follow_symlinks=False)  # a symlink is left alone


def test_encoding_round_trips_in_the_kernels_order():
    raw = acl.encode([(acl.OTHER, 5, 0xFFFFFFFF), (acl.GROUP, 7, 1234), (acl.USER_OBJ, 7, 0xFFFFFFFF)])
    assert [t for t, _, _ in acl.decode(raw)] == [acl.USER_OBJ, acl.GROUP, acl.OTHER]
