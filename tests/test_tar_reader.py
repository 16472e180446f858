"""The project's tar reader against the webdataset library's, member for member, on shards with odd
names: the same samples, keys and extensions (bench/tar_reader.py measures their speed)."""
import gzip
import io
import lzma
import tarfile

import pytest
import webdataset as wds

from data.tar import count_samples, iter_samples


def _add(t, name, data=b"x", kind=tarfile.REGTYPE):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    else:
        ti.linkname = "s1.txt" if kind == tarfile.SYMTYPE else ""
        t.addfile(ti)


def odd_shard(path, fmt):
    """Members webdataset keeps, splits or skips in particular ways, in a tar of the given format."""
    pax = {"comment": "a global PAX header"} if fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(path, "w", format=fmt, pax_headers=pax) as t:
        _add(t, "s1.txt", b"one")
        _add(t, "s1.json", b'{"text": "one"}')
        _add(t, "s1.en.TXT", b"extension with a dot, upper case")
        _add(t, "__meta__", b"webdataset metadata: skipped")
        _add(t, "__meta__/x.txt", b"in a metadata folder: skipped")
        _add(t, "d/", kind=tarfile.DIRTYPE)
        _add(t, "d/s2.txt", b"two")
        _add(t, "d/link.txt", kind=tarfile.SYMTYPE)
        _add(t, "a.b/c.d/s3.txt", b"dots in folder names")
        _add(t, "noext", b"no extension: skipped")
        _add(t, "dir.x/file", b"a dot only in the folder: skipped")
        _add(t, ".hidden", b"no key: skipped")
        _add(t, "sub/.dot.txt", b"key 'sub/'")
        _add(t, "x/__y__.txt", b"not metadata below the top")
        _add(t, "L" * 150 + "/long.name.txt", b"a long name")
        _add(t, "p" * 90 + "/" + "q" * 60 + ".txt", b"a ustar prefix")
        _add(t, "文档/é.txt", "non-ASCII".encode())
        _add(t, "s1.txt", b"the same key again, not next to it: a new sample")
        _add(t, "empty.txt", b"")
    return path


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
def test_samples_equal_the_webdataset_librarys(tmp_path, fmt):
    plain = odd_shard(str(tmp_path / "odd.tar"), fmt)
    data = open(plain, "rb").read()
    (tmp_path / "odd.tar.gz").write_bytes(gzip.compress(data))
    (tmp_path / "odd.tar.xz").write_bytes(lzma.compress(data))
    for path in (plain, str(tmp_path / "odd.tar.gz"), str(tmp_path / "odd.tar.xz")):
        theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                  for s in wds.WebDataset(path, shardshuffle=False, empty_check=False)]
        ours = list(iter_samples(path))
        assert ours == theirs, path
        assert len(ours) == count_samples(path) == 10
        assert list(iter_samples(path, skip=7)) == theirs[7:]
