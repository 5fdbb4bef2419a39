"""Files of a cache on any pyarrow filesystem (local path, s3://, gs://, ...): atomic
writes, manifests, listing, verification and deletion. No Ray here.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import DataError

KEY_FILE = "key.json"
MANIFEST = "manifest.json"


class CacheError(DataError):
    """A cache is missing, incomplete, corrupt, or does not match the run."""


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; local paths are made absolute."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    import os
    return pafs.LocalFileSystem(), os.path.abspath(root)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a unique temporary name, then rename: readers never see a partial file."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_hashed(fs: pafs.FileSystem, folder: str, write, name_for) -> tuple[str, int, str]:
    """Atomically write a file whose name depends on its checksum: `write(sink)` streams the
    bytes into a temporary file while they are hashed, then the file is renamed to
    `name_for(checksum)`. Returns (name, bytes, checksum). Streaming skips the in-memory copy
    of a whole shard that `write_atomic` needs (half the writing CPU of a 147 MiB shard)."""
    fs.create_dir(folder, recursive=True)
    tmp = join(folder, f".writing-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(tmp) as out:
        sink = _HashingSink(out)
        write(sink)
    name = name_for(sink.checksum())
    fs.move(tmp, join(folder, name))
    return name, sink.size, sink.checksum()


class _HashingSink:
    """A binary file object for pyarrow writers: passes bytes on to `out`, hashing them."""

    def __init__(self, out):
        self.out, self.hash, self.size, self.closed = out, _hasher(), 0, False

    def write(self, data) -> int:
        self.hash.update(data)
        self.out.write(data)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def checksum(self) -> str:
        return _CHECKSUM_PREFIX + self.hash.hexdigest()


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_buffer(fs: pafs.FileSystem, path: str):
    """A whole file as a pyarrow Buffer: memory-mapped on a local filesystem (no copy and no
    fresh allocation: a 97 MiB shard in ~2 ms instead of ~120 ms on this VM, where every newly
    touched page costs), else read. Files are replaced by rename, never rewritten in place, so
    a mapping stays valid."""
    import pyarrow as pa

    if isinstance(fs, pafs.LocalFileSystem):
        with pa.memory_map(path) as f:
            return f.read_buffer()
    with fs.open_input_file(path) as f:
        return f.read_buffer()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    return json.loads(read_bytes(fs, path).decode("utf-8"))


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    write_atomic(fs, path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def checksum(data) -> str:
    """A shard's checksum ("xxh3_128:<hex>"): it guards against corrupt or truncated files,
    not tampering, so a fast non-cryptographic hash (~10 GB/s) serves; sha256 (~1 GB/s) cost
    the cache job ~4 s per 4.6 GB written, and every read again."""
    h = _hasher()
    h.update(data)
    return _CHECKSUM_PREFIX + h.hexdigest()


_CHECKSUM_PREFIX = "xxh3_128:"


def _hasher():
    """The checksum's hash, fed incrementally (whole buffers and streamed writes alike)."""
    import xxhash

    return xxhash.xxh3_128()


def checksum_matches(data, shard: dict) -> bool:
    """`data` against a manifest/marker entry: its `checksum`, or the `sha256` of caches
    written before checksums moved to xxh3."""
    if "checksum" in shard:
        return checksum(data) == shard["checksum"]
    return hashlib.sha256(data).hexdigest() == shard["sha256"]


def subdirs(fs: pafs.FileSystem, path: str) -> list[str]:
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


@dataclass(frozen=True)
class ShardSet:
    set_id: str
    manifest: dict[str, Any]

    @property
    def quantities(self) -> list[str]:
        return self.manifest["quantities"]

    @property
    def columns(self) -> dict[str, dict]:
        return self.manifest["columns"]


def committed_sets(root: str, key: str) -> list[ShardSet]:
    """Shard sets of a key whose manifest has committed (others are in progress or dead)."""
    fs, base = filesystem(root)
    out = []
    for set_id in subdirs(fs, join(base, key)):
        path = join(base, key, set_id, MANIFEST)
        if exists(fs, path):
            out.append(ShardSet(set_id, read_json(fs, path)))
    return out


def list_caches(root: str) -> list[dict[str, Any]]:
    """One summary per key: key fields, rows, bytes on disk, quantities."""
    fs, base = filesystem(root)
    out = []
    for key in subdirs(fs, base):
        if not exists(fs, join(base, key, KEY_FILE)):
            continue
        fields = read_json(fs, join(base, key, KEY_FILE))
        sets = committed_sets(root, key)
        out.append({
            "key": key, "fields": fields, "rows": sets[0].manifest["rows"] if sets else 0,
            "bytes": sum(s["bytes"] for st in sets for s in st.manifest["shards"]),
            "quantities": sorted({q for st in sets for q in st.quantities}),
            "sets": [st.set_id for st in sets],
        })
    return out


def verify(root: str, key: str) -> list[str]:
    """Check every shard of every committed set against its manifest; return problems."""
    fs, base = filesystem(root)
    problems = []
    sets = committed_sets(root, key)
    if not sets:
        problems.append(f"{join(base, key)}: no committed shard set (missing or unfinished)")
    for st in sets:
        for shard in st.manifest["shards"]:
            path = join(base, key, st.set_id, shard["file"])
            if not exists(fs, path):
                problems.append(f"{path}: missing shard")
            elif not checksum_matches(read_buffer(fs, path), shard):
                problems.append(f"{path}: checksum mismatch (corrupt shard)")
    return problems


def delete(root: str, key: str) -> None:
    fs, base = filesystem(root)
    if not exists(fs, join(base, key)):
        raise CacheError(f"no cache {key} under {root}")
    fs.delete_dir(join(base, key))
