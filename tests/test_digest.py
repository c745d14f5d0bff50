"""The per-file memos: a file's hash and what a process read from it are kept only while the file is unchanged."""

import os

from tbpw.files.digest import PerFile, content_sha256


def test_a_value_read_from_a_file_is_made_again_once_the_file_is_replaced(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"first")
    memo: PerFile[bytes] = PerFile(keep=2)
    reads = []

    def read() -> bytes:
        reads.append(path.read_bytes())
        return reads[-1]

    assert memo.get(path, read) == b"first"
    assert memo.get(path, read) == b"first"
    assert len(reads) == 1  # the second get read nothing

    # same size, same mtime: only the inode and ctime tell the new file from the old one
    stat = path.stat()
    replacement = tmp_path / "model.new"
    replacement.write_bytes(b"other")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(path)
    assert memo.get(path, read) == b"other"
    assert len(reads) == 2


def test_only_the_most_recent_files_are_kept(tmp_path):
    files = [tmp_path / f"f{i}" for i in range(3)]
    for i, f in enumerate(files):
        f.write_text(str(i))
    memo: PerFile[str] = PerFile(keep=2)
    made = []

    def maker(f):
        return lambda: made.append(f.name) or f.read_text()

    for f in files:
        memo.get(f, maker(f))
    memo.get(files[2], maker(files[2]))  # kept
    memo.get(files[0], maker(files[0]))  # dropped when the third came in: read again
    assert made == ["f0", "f1", "f2", "f0"]


def test_a_changed_file_is_hashed_again(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("one")
    first = content_sha256(path)
    path.write_text("two")
    assert content_sha256(path) != first
