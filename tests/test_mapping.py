"""mapping.map_read_only: the file's bytes, read-only, in 2 MB pages where Linux allows it."""

from __future__ import annotations

import numpy as np
import pytest

from llama2nb import mapping


@pytest.mark.parametrize("size", [0, 1, 4096 + 3, 2 * mapping.HUGE_PAGE - 1, 3 * mapping.HUGE_PAGE + 5])
def test_maps_the_files_bytes_read_only(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "f.bin"
    data.tofile(path)
    if size == 0:
        with pytest.raises(ValueError):  # as np.memmap: an empty file cannot be mapped
            mapping.map_read_only(path)
        return
    mm = mapping.map_read_only(path)
    assert np.array_equal(mm, data)
    with pytest.raises(ValueError):
        mm[0] = 1


@pytest.mark.skipif(not mapping._huge_pages_possible(), reason="needs Linux with transparent huge pages")
def test_a_freshly_written_file_ends_up_wholly_in_huge_pages(tmp_path):
    # Written in 4 KB writes, the file sits in the page cache in small pages; the loader evicts
    # them and caches the file again in 2 MB pages, all of it, whatever order it is read in.
    path = tmp_path / "weights.bin"
    data = np.arange(16 * mapping.HUGE_PAGE // 4, dtype=np.float32)
    with open(path, "wb") as f:
        for start in range(0, data.nbytes, 4096):
            f.write(data.view(np.uint8)[start:start + 4096].tobytes())
    for _ in range(2):  # the second load finds the cached 2 MB pages
        mm = mapping.map_read_only(path)
        assert mapping.mapped_in_huge_pages_kb(mm) == 0  # loading touches nothing
        for block in (9, 2, 15, 0, 7):  # out of order, as the forward pass reads
            assert np.array_equal(mm[block * mapping.HUGE_PAGE:].view(np.float32)[:100],
                                  data[block * mapping.HUGE_PAGE // 4:][:100])
        assert np.array_equal(mm.view(np.float32), data)  # and then every page
        assert mapping.mapped_in_huge_pages_kb(mm) == 16 * mapping.HUGE_PAGE // 1024
        del mm


def test_a_file_that_cannot_be_evicted_still_maps(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(mapping.os, "fsync", refuse)
    monkeypatch.setattr(mapping, "_cache_in_huge_pages", lambda path, progress=None: False)  # as if in small pages
    path = tmp_path / "f.bin"
    data = np.arange(3 * mapping.HUGE_PAGE, dtype=np.uint8)
    data.tofile(path)
    assert np.array_equal(mapping.map_read_only(path), data)
