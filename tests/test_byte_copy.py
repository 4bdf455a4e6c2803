"""Byte range copies through copy_file_range and through the buffered fallback."""

import os

import pytest

from lowmem_moe import byte_copy


@pytest.fixture(params=["kernel", "buffered"])
def copy_mode(request, monkeypatch):
    if request.param == "buffered":
        monkeypatch.setattr(byte_copy, "_kernel_copy_available", False)
    elif not byte_copy._kernel_copy_available:
        pytest.skip("os.copy_file_range is missing on this platform")
    return request.param


def test_copy_range_appends_bytes(tmp_path, copy_mode):
    data = os.urandom(300_000)
    (tmp_path / "source").write_bytes(data)
    source = os.open(tmp_path / "source", os.O_RDONLY)
    target = os.open(tmp_path / "target", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(target, b"head")
        byte_copy.copy_range(source, 1000, target, 200_000, bytearray(4096))
        byte_copy.copy_range(source, 0, target, 10, bytearray(4096))
    finally:
        os.close(source)
        os.close(target)

    assert (tmp_path / "target").read_bytes() == b"head" + data[1000:201_000] + data[:10]


def test_copy_range_short_source_raises(tmp_path, copy_mode):
    (tmp_path / "source").write_bytes(b"x" * 1000)
    source = os.open(tmp_path / "source", os.O_RDONLY)
    target = os.open(tmp_path / "target", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(EOFError):
            byte_copy.copy_range(source, 500, target, 1000, bytearray(256))
    finally:
        os.close(source)
        os.close(target)
