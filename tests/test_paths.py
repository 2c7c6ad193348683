"""Remote path validation and the symlink-proof folder walk (PROTOCOL.md S7, 7.2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flask_bits import paths
from flask_bits.errors import AccessDenied
from flask_bits.errors import BITSError
from flask_bits.errors import DestinationFolderMissing
from flask_bits.errors import InvalidRequest
from flask_bits.errors import StorageError


@pytest.mark.parametrize(
    ("remote", "names"),
    [
        ("file.txt", ("file.txt",)),
        ("a/b/c.bin", ("a", "b", "c.bin")),
        ("my file.txt", ("my file.txt",)),
        ("a..b", ("a..b",)),
        (".hidden", (".hidden",)),
        ("\u00fcber/\u0444\u0430\u0439\u043b.txt", ("\u00fcber", "\u0444\u0430\u0439\u043b.txt")),
        ("console.txt", ("console.txt",)),  # starts like CON but is not a device name
        ("com10.log", ("com10.log",)),
        ("x" * 255, ("x" * 255,)),
    ],
)
def test_split_remote_path_accepts_plain_names(remote: str, names: tuple[str, ...]) -> None:
    assert paths.split_remote_path(remote) == names


@pytest.mark.parametrize(
    "remote",
    [
        "",  # the prefix root itself
        "dir/",  # names a folder
        "a//b",  # empty segment
        "/a",  # leading empty segment ("/bits//a")
        "//server/share/file",  # UNC with forward slashes
        "a\x00b",  # NUL
        "a\x01b",
        "a\x1fb",
        "a\tb",
        "a\nb",
        "a\x7fb",
        "bad\ufffdname",  # what an undecodable byte turns into
        "file.",  # trailing dot (Windows strips it)
        "file..",
        "dir./file",
        "file ",  # trailing space
        "dir /file",
        " file",  # leading space
        "x" * 256,  # name longer than 255 bytes
        "\u00e9" * 128,  # 256 bytes of UTF-8
        "/".join(["d"] * 513),  # path longer than 1,024 characters
    ],
)
def test_split_remote_path_rejects_malformed_paths(remote: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        paths.split_remote_path(remote)
    assert info.value.status == 400
    assert info.value.hresult == 0x80070057


@pytest.mark.parametrize(
    "remote",
    [
        "..",
        "../x",
        "a/../b",
        "a/..",
        ".",
        "./a",
        "a/./b",
        "a\\b",  # backslash
        "..\\x",
        "\\\\server\\share\\file",  # UNC
        "C:",  # drive letter
        "C:/x",
        "c:file.txt",
        "C:\\Windows\\win.ini",
        "a:b",  # alternate data stream
        "a*b",
        "a?b",
        'a"b',
        "a<b",
        "a>b",
        "a|b",
        "CON",  # device names, with or without extension, any case
        "con",
        "nul.txt",
        "NUL.tar.gz",
        "dir/aux",
        "PRN.log",
        "COM1",
        "com9.txt",
        "LPT1",
        "lpt9.dat",
        "CONIN$",
        ".bits-session.tmp",  # the server's own temporary files
    ],
)
def test_split_remote_path_refuses_escapes_and_reserved_names(remote: str) -> None:
    with pytest.raises(AccessDenied) as info:
        paths.split_remote_path(remote)
    assert info.value.status == 403
    assert info.value.hresult == 0x80070005


def test_destination_path_stays_under_root(tmp_path: Path) -> None:
    root = str(tmp_path)
    dest = paths.destination_path(root, ("a", "b.txt"))
    assert dest == os.path.join(root, "a", "b.txt")


# -- open_parent / destination_exists ------------------------------------------------------


def test_open_parent_walks_existing_folders(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "marker").write_bytes(b"")
    with paths.open_parent(str(tmp_path), ("a", "b", "file.txt")) as fd:
        assert "marker" in os.listdir(fd)


def test_open_parent_of_a_top_level_name_is_the_root(tmp_path: Path) -> None:
    (tmp_path / "marker").write_bytes(b"")
    with paths.open_parent(str(tmp_path), ("file.txt",)) as fd:
        assert "marker" in os.listdir(fd)


def test_open_parent_missing_folder_is_404(tmp_path: Path) -> None:
    with pytest.raises(DestinationFolderMissing) as info:
        with paths.open_parent(str(tmp_path), ("missing", "file.txt")):
            pass  # pragma: no cover
    assert info.value.status == 404
    assert not (tmp_path / "missing").exists()  # never created


def test_open_parent_refuses_a_symlinked_folder(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AccessDenied):
        with paths.open_parent(str(root), ("link", "file.txt")):
            pass  # pragma: no cover


def test_open_parent_refuses_a_symlink_deeper_in_the_chain(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    outside = tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (outside / "b").mkdir(parents=True)
    (root / "a" / "b").symlink_to(outside / "b", target_is_directory=True)
    with pytest.raises(AccessDenied):
        with paths.open_parent(str(root), ("a", "b", "file.txt")):
            pass  # pragma: no cover


def test_open_parent_refuses_a_file_used_as_folder(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(BITSError) as info:
        with paths.open_parent(str(tmp_path), ("plain", "file.txt")):
            pass  # pragma: no cover
    assert info.value.status in (403, 404)


def test_open_parent_with_missing_root(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        with paths.open_parent(str(tmp_path / "nope"), ("file.txt",)):
            pass  # pragma: no cover


def test_destination_exists(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert paths.destination_exists(root, ("file.txt",)) is False
    (tmp_path / "file.txt").write_bytes(b"x")
    assert paths.destination_exists(root, ("file.txt",)) is True


def test_destination_exists_counts_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "link.txt").symlink_to(tmp_path / "nowhere")
    assert paths.destination_exists(str(tmp_path), ("link.txt",)) is True


def test_destination_that_is_a_folder_is_400(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(InvalidRequest) as info:
        paths.destination_exists(str(tmp_path), ("dir",))
    assert info.value.status == 400


def test_destination_exists_through_symlinked_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AccessDenied):
        paths.destination_exists(str(root), ("link", "secret.txt"))
