"""copies.copy_bytes: in-kernel copies where the system has them, a plain loop otherwise, same bytes always."""

from __future__ import annotations

import errno
import os

import pytest

from loop.data import decode
from loop.sorting import copies


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.jpg"
    path.write_bytes(os.urandom(3 * copies.COPY_CHUNK + 12345))
    return path


def _copy(src, dest):
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        how = copies.copy_bytes(fin, fout)
    return how


def test_copy_bytes_gives_identical_bytes(source, tmp_path):
    how = _copy(source, tmp_path / "out.jpg")
    assert (tmp_path / "out.jpg").read_bytes() == source.read_bytes()
    expected = {"reflink", "copy_file_range"} if hasattr(os, "copy_file_range") else {"read_write"}
    assert how in expected


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="Linux only")
def test_a_kernel_copy_failing_midway_starts_over_with_a_plain_loop(source, tmp_path, monkeypatch):
    import fcntl

    real = os.copy_file_range
    calls = []

    def half_then_fail(fd_in, fd_out, count):
        calls.append(count)
        if len(calls) == 1:
            return real(fd_in, fd_out, copies.COPY_CHUNK)  # a partial copy, then the file system refuses
        raise OSError(errno.EXDEV, "cross-device")

    def no_reflink(*args):
        raise OSError(errno.EOPNOTSUPP, "no reflink")

    monkeypatch.setattr(fcntl, "ioctl", no_reflink)
    monkeypatch.setattr(os, "copy_file_range", half_then_fail)
    assert _copy(source, tmp_path / "out.jpg") == "read_write"
    assert (tmp_path / "out.jpg").read_bytes() == source.read_bytes()
    assert len(calls) == 2


def test_without_kernel_copies_the_loop_copies(source, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    assert _copy(source, tmp_path / "out.jpg") == "read_write"
    assert (tmp_path / "out.jpg").read_bytes() == source.read_bytes()


def test_workers_follow_the_affinity_mask_not_the_host(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert decode.available_cpus() == 1
    assert decode.default_workers(4) == 1
    assert decode.default_workers(0) == 0


def test_the_model_gets_the_cpus_the_decoders_leave(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert decode.model_threads(2) == 1  # 2 decoders on 2 CPUs: one thread, not four on two
    assert decode.model_threads(0) == 2  # decoding in the main process: the model may use every CPU
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert decode.model_threads(2) == 6


def _safe_copy_whole(source, tmp_path):
    """`safe_copy` of `source` into a new folder; asserts the copy was made and is whole."""
    folder = tmp_path / "sorted"
    folder.mkdir()
    st = source.stat()
    final, copied = copies.safe_copy(source, folder, "photo.jpg", image_id="unused", size=st.st_size,
                                     mtime_ns=st.st_mtime_ns)
    assert copied and final.read_bytes() == source.read_bytes()
    return final


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise: Linux and BSDs only")
def test_a_copy_leaves_the_page_cache_only_once_it_is_on_disk(source, tmp_path, monkeypatch):
    """The copy's pages are dropped from the cache after its fsync (dropping dirty pages would do nothing, and
    the advice must never come before the bytes are safe), and the copy is whole."""
    events = []
    real_fsync, real_fadvise = os.fsync, os.posix_fadvise
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (
        events.append(("drop" if advice == os.POSIX_FADV_DONTNEED else advice, os.fstat(fd).st_ino)),
        real_fadvise(fd, offset, length, advice))[1])
    final = _safe_copy_whole(source, tmp_path)
    copy_inode = final.stat().st_ino
    mine = [what for what, inode in events if inode == copy_inode]
    assert mine[:2] == ["fsync", "drop"]


def test_a_file_system_that_refuses_the_advice_still_gets_its_copy(source, tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.EINVAL, "not supported")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    _safe_copy_whole(source, tmp_path)
