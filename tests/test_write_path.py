"""The one write path: exclusive temp files, no link followed, the umask obeyed."""

import json
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


def _modes(folder):
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}


def test_evaluate_writes_are_atomic_and_never_through_links(retrieval_checkpoint, tmp_path, capsys):
    """evaluate's metrics.json, rankings and examples.html: a planted symbolic link is
    refused before the pass (the file it points to untouched); a hard link to a file
    outside is replaced, not written through; no temporary file is left; umask modes."""
    from vlmtune.cli import main

    outside = tmp_path / "outside.json"
    outside.write_text("mine")
    out = tmp_path / "eval"
    out.mkdir()
    for name in ("metrics.json", "rankings_t2i.jsonl", "examples.html"):
        (out / name).symlink_to(outside)
        capsys.readouterr()
        assert main(["evaluate", str(retrieval_checkpoint), "--rankings", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert name in err and "symbolic link" in err and "Traceback" not in err
        assert outside.read_text() == "mine"
        (out / name).unlink()

    os.link(outside, out / "metrics.json")
    os.link(outside, out / "examples.html")
    old = os.umask(0o022)
    try:
        args = ["evaluate", str(retrieval_checkpoint), "--rankings", "--examples", "2", "--output-dir", str(out)]
        assert main(args) == 0
    finally:
        os.umask(old)
    assert outside.read_text() == "mine" and outside.stat().st_nlink == 1
    assert "retrieval/t2i_r1" in json.loads((out / "metrics.json").read_text())
    assert "<html" in (out / "examples.html").read_text().lower()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["examples.html", "metrics.json", "rankings_i2t.jsonl", "rankings_t2i.jsonl"], names
    assert set(_modes(out).values()) == {0o644}


def test_compare_figures_never_through_links(tmp_path):
    from matplotlib.figure import Figure

    from vlmtune.report import _save

    outside = tmp_path / "outside.png"
    outside.write_bytes(b"mine")
    out = tmp_path / "report"
    out.mkdir()
    (out / "losses.png").symlink_to(outside)
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    with pytest.raises(VlmtuneError, match="symbolic link"):
        _save(fig, out, "losses.png")
    assert outside.read_bytes() == b"mine"
    (out / "losses.png").unlink()
    _save(fig, out, "losses.png")
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["losses.png"]
