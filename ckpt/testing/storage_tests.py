"""The storage conformance suite: what every :class:`~ckpt.storage.Storage` backend promises,
as tests (the model is zarr-python's ``StoreTests``). Needs pytest.

Subclass :class:`StorageTests` in a test module and provide a ``storage`` fixture giving a
Storage on an empty root; every ``test_*`` method then runs against it::

    class TestMyBackend(StorageTests):
        @pytest.fixture
        def storage(self, tmp_path):
            return open_storage(str(tmp_path / "root"))

Class attributes say where backends may differ within the contract:

- ``identical_create_succeeds``: what a create-only write meets when the file is there already
  holding exactly the bytes given. The contract leaves it to the backend: ``False`` (local
  disks, ``memory://``: ``put_if_absent`` says False, ``write_file`` raises "already exists") or
  ``True`` (S3: a retried create-only PUT whose first try landed is told apart from a competing
  writer only by comparing the bytes there, so identical bytes count as ours: ``put_if_absent``
  True, ``write_file`` succeeds). Different bytes are always refused, and the file is never
  changed.
- ``multipart_bytes``: a ``write_file`` size that takes the backend's multipart path (None: it
  has none); :meth:`StorageTests.start_upload` starts an upload under the root for the
  ``multipart_uploads``/``abort_upload`` tests (backends with uploads override it);
  ``lists_uploads = False`` where the service cannot list them (GCS resumable uploads expire on
  their own after a week).
- ``stores_crc32c``: ``stat`` gives the CRC-32C the service keeps with each file (S3 for the
  files ckpt writes, GCS for all); elsewhere it gives None.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import crc32c
import pytest

from ckpt.errors import (
    ChecksumMismatchError,
    MissingShardError,
    ShardSizeMismatchError,
    StorageError,
    StorageTimeoutError,
)
from ckpt.storage import Checked, Storage, Upload
from ckpt.storage._base import chunk_data

DATA = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable


def _chunks(data: bytes, n: int = 100) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


class _Broken(Exception):
    """The data source failed (raised by a chunk iterator midway)."""


def _failing(data: bytes, after: int, n: int = 100) -> Iterator[bytes]:
    sent = 0
    for chunk in _chunks(data, n):
        if sent >= after:
            raise _Broken("the data source failed midway")
        sent += len(chunk)
        yield chunk


class StorageTests:
    """The contract of :class:`~ckpt.storage.Storage` (module docstring). Subclasses provide
    the ``storage`` fixture: a Storage on an empty root."""

    identical_create_succeeds: bool = False
    multipart_bytes: int | None = None
    lists_uploads: bool = True  # with multipart_bytes: its uploads in progress can be listed
    stores_crc32c: bool = False  # ``stat`` gives the CRC-32C the service keeps for a file

    @pytest.fixture
    def storage(self) -> Storage:
        raise NotImplementedError("a StorageTests subclass provides the storage fixture")

    def start_upload(self, storage: Storage, rel: str) -> Upload:
        """Start a multipart upload of ``rel`` and leave it open (backends with uploads)."""
        raise NotImplementedError

    # --- write_file ----------------------------------------------------------------------------

    def test_write_file_then_read(self, storage: Storage) -> None:
        storage.write_file("d/x.bin", _chunks(DATA), size=len(DATA), fsync=True)
        assert storage.read("d/x.bin") == DATA
        assert storage.size("d/x.bin") == len(DATA)
        assert storage.exists("d/x.bin")

    def test_stat(self, storage: Storage) -> None:
        """The size, and the CRC-32C where the service keeps one (``stores_crc32c``: then it
        must be the file's; elsewhere None); a missing file is MissingShardError."""
        storage.write_file("d/x.bin", _chunks(DATA), size=len(DATA), fsync=False)
        got = storage.stat("d/x.bin")
        assert got.size == len(DATA)
        assert got.crc32c == (crc32c.crc32c(DATA) if self.stores_crc32c else None)
        with pytest.raises(MissingShardError):
            storage.stat("d/none.bin")

    def test_write_file_empty(self, storage: Storage) -> None:
        storage.write_file("d/empty", iter([]), size=0, fsync=False)
        assert storage.exists("d/empty")
        assert storage.size("d/empty") == 0
        assert storage.read("d/empty") == b""

    def test_write_file_callable_source(self, storage: Storage) -> None:
        calls: list[int] = []

        def source() -> Iterator[bytes]:
            calls.append(1)
            return _chunks(DATA, 37)

        storage.write_file("x.bin", source, size=len(DATA), fsync=False)
        assert storage.read("x.bin") == DATA
        assert calls, "the callable source was never called"

    def test_write_file_memoryview_chunks(self, storage: Storage) -> None:
        view = memoryview(DATA)
        storage.write_file("x.bin", [view[:10], view[10:500], view[500:]], size=len(DATA), fsync=False)
        assert storage.read("x.bin") == DATA

    def test_write_file_many_small_chunks(self, storage: Storage) -> None:
        """Thousands of small chunks (a state of many small tensors), some empty, around large
        ones and of other item sizes: the file holds them in order (a backend may gather them)."""
        rng = random.Random(3)
        chunks: list[memoryview | bytes | Checked] = []
        for i in range(3000):
            n = rng.choice([0, 1, 7, 1000, 4096, 30000])
            data = bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1)
            data = data[:n]
            if i % 3 == 0:
                chunks.append(memoryview(bytearray(data)))
            elif i % 3 == 1:
                chunks.append(Checked(data, crc32c.crc32c(data)))
            else:
                chunks.append(data)
            if i == 1500:
                chunks.append(memoryview(bytes(range(256)) * (5 << 12)))  # 5 MiB on its own
        whole = b"".join(bytes(chunk_data(c)) for c in chunks)
        storage.write_file("x.bin", chunks, size=len(whole), fsync=True, stable=True)
        assert storage.read("x.bin") == whole
        storage.sync_files(["x.bin"])  # a flush afterwards is harmless

    def test_write_file_never_overwrites(self, storage: Storage) -> None:
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        with pytest.raises(StorageError, match="already exists"):
            storage.write_file("x.bin", [b"other"], size=5, fsync=False)
        assert storage.read("x.bin") == DATA

    def test_write_file_identical_bytes(self, storage: Storage) -> None:
        """The same bytes again: refused, or (S3, module docstring) accepted as our own; either
        way the file is unchanged."""
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        if self.identical_create_succeeds:
            storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        else:
            with pytest.raises(StorageError, match="already exists"):
                storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        assert storage.read("x.bin") == DATA
        assert [f.path for f in storage.list_files()] == ["x.bin"]

    def test_write_file_failing_source_leaves_nothing(self, storage: Storage) -> None:
        """A chunk iterator that raises midway: the write fails, and no file (partial or empty)
        is published."""
        with pytest.raises((StorageError, _Broken)):
            storage.write_file("d/x.bin", _failing(DATA, 300), size=len(DATA), fsync=False)
        assert not storage.exists("d/x.bin")
        assert [f.path for f in storage.list_files()] == []
        storage.write_file("d/x.bin", [DATA], size=len(DATA), fsync=False)  # the name is free
        assert storage.read("d/x.bin") == DATA

    def test_write_file_reused_buffer(self, storage: Storage) -> None:
        """``streams_chunks``: each chunk is consumed before the next is asked for, so a caller
        may refill one buffer."""
        if not storage.streams_chunks:
            pytest.skip("the backend does not stream chunks (it may hold them all)")
        buf = bytearray(100)

        def refill() -> Iterator[memoryview]:
            for i in range(0, len(DATA), 100):
                piece = DATA[i : i + 100]
                buf[: len(piece)] = piece
                yield memoryview(buf)[: len(piece)]

        storage.write_file("x.bin", refill(), size=len(DATA), fsync=False)
        assert storage.read("x.bin") == DATA

    def test_write_file_multipart(self, storage: Storage) -> None:
        if self.multipart_bytes is None:
            pytest.skip("the backend has no multipart path")
        data = bytes(range(251)) * (self.multipart_bytes // 251 + 1)
        storage.write_file("big.bin", _chunks(data, 1 << 20), size=len(data), fsync=False)
        assert storage.size("big.bin") == len(data)
        out = bytearray(1000)
        storage.read_into("big.bin", len(data) - 1000, [memoryview(out)])
        assert bytes(out) == data[-1000:]
        assert storage.multipart_uploads() == []

    def test_write_file_multipart_failing_source(self, storage: Storage) -> None:
        """A source that fails after the first part: nothing published, no upload left open."""
        if self.multipart_bytes is None:
            pytest.skip("the backend has no multipart path")
        data = bytes(range(251)) * (self.multipart_bytes // 251 + 1)
        with pytest.raises((StorageError, _Broken)):
            storage.write_file("big.bin", _failing(data, len(data) - (1 << 20), 1 << 20), size=len(data), fsync=False)
        assert not storage.exists("big.bin")
        assert storage.multipart_uploads() == []

    # --- put_if_absent and put -----------------------------------------------------------------

    def test_put_if_absent_creates(self, storage: Storage) -> None:
        assert storage.put_if_absent("s/manifest.json", b"{1}", fsync=True) is True
        assert storage.read("s/manifest.json") == b"{1}"
        assert [f.path for f in storage.list_files()] == ["s/manifest.json"]  # no temp file left

    def test_put_if_absent_different_bytes(self, storage: Storage) -> None:
        assert storage.put_if_absent("m", b"first", fsync=False) is True
        assert storage.put_if_absent("m", b"second", fsync=False) is False
        assert storage.put_if_absent("m", b"firs", fsync=False) is False  # a prefix is not ours
        assert storage.read("m") == b"first"

    def test_put_if_absent_identical_bytes(self, storage: Storage) -> None:
        """What is there byte for byte: the backend's documented answer (module docstring);
        either way nothing changes."""
        assert storage.put_if_absent("m", b"same", fsync=False) is True
        assert storage.put_if_absent("m", b"same", fsync=False) is self.identical_create_succeeds
        assert storage.read("m") == b"same"
        assert [f.path for f in storage.list_files()] == ["m"]

    def test_put_if_absent_over_write_file(self, storage: Storage) -> None:
        storage.write_file("m", [b"data"], size=4, fsync=False)
        assert storage.put_if_absent("m", b"other", fsync=False) is False
        assert storage.read("m") == b"data"

    def test_put_if_absent_races(self, storage: Storage) -> None:
        """Eight threads create the same file with different bytes: exactly one wins, and the
        file holds the winner's bytes."""
        if not storage.atomic_create:
            pytest.skip("the backend's create-only write is not atomic")
        results: dict[int, bool] = {}
        start = threading.Barrier(8)

        def one(i: int) -> None:
            start.wait()
            results[i] = storage.put_if_absent("race", f"writer {i}".encode(), fsync=False)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, won in results.items() if won]
        assert len(winners) == 1, results
        assert storage.read("race") == f"writer {winners[0]}".encode()

    def test_put_replaces(self, storage: Storage) -> None:
        storage.put("LATEST", b"1", fsync=True)
        assert storage.read("LATEST") == b"1"
        storage.put("LATEST", b"22", fsync=False)
        assert storage.read("LATEST") == b"22"
        assert [f.path for f in storage.list_files()] == ["LATEST"]  # no temp file left

    # --- reads ---------------------------------------------------------------------------------

    def test_read_into_edges(self, storage: Storage) -> None:
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        n = len(DATA)

        def read(start: int, *sizes: int) -> list[bytes]:
            bufs = [bytearray(s) for s in sizes]
            storage.read_into("x.bin", start, [memoryview(b) for b in bufs])
            return [bytes(b) for b in bufs]

        assert read(0, 10) == [DATA[:10]]  # the start
        assert read(0, n) == [DATA]  # the whole file
        assert read(n - 7, 7) == [DATA[-7:]]  # up to the end exactly
        assert read(n - 1, 1) == [DATA[-1:]]
        assert read(5, 3, 0, 4, 0, 9) == [DATA[5:8], b"", DATA[8:12], b"", DATA[12:21]]  # several, some empty
        assert read(100, 0) == [b""]  # nothing to read
        assert read(n, 0) == [b""]  # nothing to read, at the end
        assert read(3, *[1] * 50) == [DATA[i : i + 1] for i in range(3, 53)]

    def test_read_into_past_the_end(self, storage: Storage) -> None:
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        with pytest.raises(ShardSizeMismatchError, match=r"x\.bin"):
            storage.read_into("x.bin", len(DATA) - 4, [memoryview(bytearray(8))])
        with pytest.raises(ShardSizeMismatchError, match=r"x\.bin"):
            storage.read_into("x.bin", 0, [memoryview(bytearray(len(DATA))), memoryview(bytearray(1))])

    def test_read_into_starting_past_the_end(self, storage: Storage) -> None:
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        with pytest.raises(ShardSizeMismatchError, match=r"x\.bin"):
            storage.read_into("x.bin", len(DATA) + 10, [memoryview(bytearray(4))])

    def test_read_pieces(self, storage: Storage) -> None:
        """Each piece holds its bytes when ``landed`` is called for it, the next one not yet."""
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        sizes = [[3, 0, 4], [], [9], [1] * 5, [30]]
        pieces = [[memoryview(bytearray(s)) for s in piece] for piece in sizes]
        seen: list[tuple[int, list[bytes], list[bytes]]] = []

        def landed(i: int) -> None:
            nxt = pieces[i + 1] if i + 1 < len(pieces) else []
            seen.append((i, [bytes(b) for b in pieces[i]], [bytes(b) for b in nxt]))

        storage.read_pieces("x.bin", 5, pieces, landed)
        pos, want = 5, []
        for i, piece in enumerate(sizes):
            got = []
            for s in piece:
                got.append(DATA[pos : pos + s])
                pos += s
            nxt = [bytes(s) for s in sizes[i + 1]] if i + 1 < len(sizes) else []
            want.append((i, got, nxt))  # the next piece's buffers still all zeros
        assert seen == want

    def test_read_pieces_stops_at_an_error_of_landed(self, storage: Storage) -> None:
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        pieces = [[memoryview(bytearray(8))] for _ in range(3)]

        def landed(i: int) -> None:
            if i == 1:
                raise ChecksumMismatchError("piece 1 is bad")

        with pytest.raises(ChecksumMismatchError, match="piece 1 is bad"):
            storage.read_pieces("x.bin", 0, pieces, landed)
        assert bytes(pieces[2][0]) == bytes(8)  # never read

    def test_read_pieces_past_the_end(self, storage: Storage) -> None:
        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        done: list[int] = []
        pieces = [[memoryview(bytearray(len(DATA) - 4))], [memoryview(bytearray(8))]]
        with pytest.raises(ShardSizeMismatchError, match=r"x\.bin"):
            storage.read_pieces("x.bin", 0, pieces, done.append)
        assert done == [0]

    def test_missing(self, storage: Storage) -> None:
        assert storage.exists("nope/x.bin") is False
        with pytest.raises(MissingShardError, match=r"x\.bin"):
            storage.read("nope/x.bin")
        with pytest.raises(MissingShardError, match=r"x\.bin"):
            storage.size("nope/x.bin")
        with pytest.raises(MissingShardError, match=r"x\.bin"):
            storage.read_into("nope/x.bin", 0, [memoryview(bytearray(4))])

    # --- listing and deleting ------------------------------------------------------------------

    def _tree(self, storage: Storage) -> dict[str, bytes]:
        files = {"top": b"t", "a/x": b"xx", "a/y": b"yyy", "a/sub/z": b"zzzz", "ab/w": b"w", "b/v": b"v"}
        for rel, data in files.items():
            storage.write_file(rel, [data], size=len(data), fsync=False)
        return files

    def test_list_files(self, storage: Storage) -> None:
        files = self._tree(storage)
        listed = storage.list_files()
        assert [f.path for f in listed] == sorted(files)
        assert {f.path: f.size for f in listed} == {k: len(v) for k, v in files.items()}
        assert all(f.mtime > 0 for f in listed)

    def test_list_files_prefix(self, storage: Storage) -> None:
        self._tree(storage)
        want = ["a/sub/z", "a/x", "a/y"]  # nothing under "ab/": a prefix is a directory
        assert [f.path for f in storage.list_files("a")] == want
        assert [f.path for f in storage.list_files("a/")] == want
        assert [f.path for f in storage.list_files("a/sub")] == ["a/sub/z"]
        assert storage.list_files("missing") == []
        assert storage.list_files("missing/deeper/") == []

    def test_list_files_empty_root(self, storage: Storage) -> None:
        assert storage.list_files() == []

    def test_delete(self, storage: Storage) -> None:
        self._tree(storage)
        storage.delete("a/x")
        assert not storage.exists("a/x")
        assert [f.path for f in storage.list_files("a")] == ["a/sub/z", "a/y"]
        storage.delete("a/x")  # absent: nothing to do
        storage.delete("never/there")

    def test_delete_tree(self, storage: Storage) -> None:
        self._tree(storage)
        storage.delete_tree("a")
        assert [f.path for f in storage.list_files()] == ["ab/w", "b/v", "top"]
        storage.delete_tree("a")  # absent: nothing to do

    def test_remove_empty_dir(self, storage: Storage) -> None:
        self._tree(storage)
        storage.delete("b/v")
        storage.remove_empty_dir("b")
        storage.remove_empty_dir("a")  # not empty: kept
        assert [f.path for f in storage.list_files("a")] == ["a/sub/z", "a/x", "a/y"]

    # --- uploads in progress -------------------------------------------------------------------

    def test_multipart_uploads(self, storage: Storage) -> None:
        assert storage.multipart_uploads() == []
        if self.multipart_bytes is None or not self.lists_uploads:
            with pytest.raises(StorageError):
                storage.abort_upload(Upload("x", "no-such-upload", 0.0))
            return
        upload = self.start_upload(storage, "d/big.bin")
        (listed,) = storage.multipart_uploads()
        assert (listed.key, listed.upload_id) == ("d/big.bin", upload.upload_id)
        assert listed.initiated > 0
        storage.abort_upload(listed)
        assert storage.multipart_uploads() == []
        assert not storage.exists("d/big.bin")

    # --- deadlines -----------------------------------------------------------------------------

    def test_hung_call_times_out(self, storage: Storage) -> None:
        """A storage call that hangs ends in StorageTimeoutError within the storage's own
        deadline (``io_timeout_s``), naming the file; the caller is not held (the hung thread
        ends once released)."""
        from ckpt.testing.faults import Recorder, Rule
        from ckpt.testing.faulty_storage import FaultyStorage

        storage.write_file("x.bin", [DATA], size=len(DATA), fsync=False)
        rec = Recorder(rules=[Rule("read_into", hang=True)])
        faulty = FaultyStorage(storage, rec)
        faulty.io_timeout_s = 0.2
        out = bytearray(4)
        try:
            with pytest.raises(StorageTimeoutError, match=r"x\.bin: read"):
                faulty.read_into("x.bin", 0, [memoryview(out)])
        finally:
            rec.release()
        assert faulty.read("x.bin") == DATA  # the rule fired once; the storage still works
        assert [c.op for c in rec.calls] == ["read_into", "read"]
