"""mapping.map_read_only: the file's bytes, read-only, in 2 MB pages where Linux allows it."""

from __future__ import annotations

import numpy as np
import pytest

from llama2nb import mapping


def mapped_in_huge_pages_kb(mm: np.memmap) -> int:
    """FilePmdMapped of mm's mapping, from /proc/self/smaps."""
    header = f"{mm.ctypes.data:x}-"
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                inside = line.startswith(header)
            elif inside and line.startswith("FilePmdMapped:"):
                return int(line.split()[1])
    raise AssertionError("mapping not found in /proc/self/smaps")


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
def test_a_freshly_written_file_ends_up_in_huge_pages(tmp_path):
    # Written just now, the file sits in the page cache in small pages; the loader evicts them
    # and maps the file again, so that it streams in 2 MB pages.
    path = tmp_path / "weights.bin"
    data = np.arange(16 * mapping.HUGE_PAGE // 4, dtype=np.float32)
    with open(path, "wb") as f:  # in 4 KB writes, which leave it cached in 4 KB pages
        for start in range(0, data.nbytes, 4096):
            f.write(data.view(np.uint8)[start:start + 4096].tobytes())
    first = mapping.map_read_only(path)
    assert np.array_equal(first.view(np.float32), data)  # touches every page
    assert mapped_in_huge_pages_kb(first) >= 8 * mapping.HUGE_PAGE // 1024
    # a second mapping finds the cached 2 MB pages and needs no re-read
    second = mapping.map_read_only(path)
    assert np.array_equal(second.view(np.float32), data)
    assert mapped_in_huge_pages_kb(second) >= 8 * mapping.HUGE_PAGE // 1024
