"""The one write path: exclusive temp files, no link followed, the umask obeyed."""

import os

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.runfolder import write_atomic


def test_write_atomic_ignores_planted_tmp_link_and_follows_umask(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "embed.json.tmp").symlink_to(victim)
    old = os.umask(0o022)
    try:
        write_atomic(out / "embed.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(old)
    assert victim.read_text() == "mine"
    assert (out / "embed.json").read_text() == "{}"
    assert (out / "embed.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["embed.json", "embed.json.tmp"]


def test_write_atomic_refuses_link_target_and_cleans_up(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "items.jsonl").symlink_to(victim)
    with pytest.raises(VlmtuneError, match="symbolic link"):
        write_atomic(tmp_path / "items.jsonl", lambda p: p.write_text("x"))
    assert victim.read_text() == "mine"

    def boom(p):
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "new.txt", boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl", "victim.txt"]
