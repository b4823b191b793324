"""Image splits kept on disk: `.npy` files written once by `prepare`, read a batch at a time by training.

A split's images are one uint8 (N, C, H, W) array in a plain `.npy` file (numpy's format: a header, then the
C-order bytes), so any tool reads it. `OnDiskArray` reads rows with positioned reads (`os.pread`), not a
memory map: the pages it reads are not mapped into the process, so a training process's resident memory does
not grow with the dataset (a memory map's pages count in RSS once touched). `BatchStream` feeds the training
loop through a torch DataLoader: worker processes read the next batches while the device trains, into pinned
memory on a GPU, and stay alive across epochs.

Only numpy and torch are imported here; the DataLoader machinery is imported when a stream is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from kdpipe.data.batches import Split
from kdpipe.data.splits import DataError

CHUNK_BYTES = 64 << 20  # what a whole-array pass (digest, statistics, copy to memory) reads at a time


class OnDiskArray:
    """A read-only uint8 array (N, ...) in a `.npy` file, read lazily. Picklable (path, offset and shape only: a
    DataLoader worker opens its own file descriptor)."""

    dtype = torch.uint8  # what the digest and the training loop see, as for an in-memory split

    def __init__(self, path: str | Path, offset: int, shape: tuple[int, ...]):
        self.path, self.offset, self.shape = Path(path), offset, torch.Size(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64))
        self._fd: int | None = None
        self._pid = -1

    @classmethod
    def open(cls, path: str | Path) -> OnDiskArray:
        """Check the `.npy` header (uint8, C order) and that the file holds every byte it announces."""
        path = Path(path)
        rerun = "rerun the prepare stage (dvc repro prepare)"
        if not path.is_file():
            raise DataError(f"{path}: not found; {rerun}")
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy file ({e}); {rerun}") from None
        if dtype != np.uint8 or fortran or len(shape) < 2:
            raise DataError(f"{path}: holds {dtype} {shape}{' in Fortran order' if fortran else ''}, expected uint8 "
                            f"(N, C, H, W) in C order; {rerun}")
        array = cls(path, offset, shape)
        if path.stat().st_size < offset + array.nbytes:
            raise DataError(f"{path}: truncated ({path.stat().st_size} bytes, its header announces "
                            f"{offset + array.nbytes}); {rerun}")
        return array

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows start:stop (step 1) as a uint8 tensor, in one read."""
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("OnDiskArray reads contiguous slices only")
        n = max(stop - start, 0)
        out = np.empty((n, *self.shape[1:]), dtype=np.uint8)
        self._read_into(out, start)
        return torch.from_numpy(out)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows at positions `idx` (any order, repeats allowed) as a uint8 tensor, one read per row."""
        positions = idx.tolist()
        out = np.empty((len(positions), *self.shape[1:]), dtype=np.uint8)
        flat = out.reshape(len(positions), -1)
        fd = self._file()
        for k, i in enumerate(positions):
            if not 0 <= i < len(self):
                raise IndexError(f"{self.path}: row {i} out of range for {len(self)} rows")
            if os.preadv(fd, [flat[k]], self.offset + i * self.row_bytes) != self.row_bytes:
                raise DataError(f"{self.path}: short read at row {i}; the file changed after prepare, rerun it")
        return torch.from_numpy(out)

    def _read_into(self, out: np.ndarray, start: int) -> None:
        view, done = memoryview(out.reshape(-1)), 0
        position = self.offset + start * self.row_bytes
        while done < len(view):  # one pread returns at most ~2 GiB
            n = os.preadv(self._file(), [view[done:]], position + done)
            if n <= 0:
                raise DataError(f"{self.path}: short read; the file changed after prepare, rerun it")
            done += n

    def chunks(self) -> Iterator[torch.Tensor]:
        """The whole array, CHUNK_BYTES at a time, in order."""
        step = max(1, CHUNK_BYTES // max(self.row_bytes, 1))
        for start in range(0, len(self), step):
            yield self[start : start + step]

    def load(self) -> torch.Tensor:
        """The whole array in memory."""
        return self[:]


class NpyWriter:
    """Writes a uint8 `.npy` of a known shape chunk by chunk, never holding it whole, under a temporary name
    beside `path` (prepare renames it into place once every split is complete, so a failed prepare leaves the old
    dataset whole). `close()` checks the row count and returns the array, still under its temporary name."""

    def __init__(self, path: str | Path, shape: tuple[int, ...]):
        self.path, self.shape, self.rows = Path(path), tuple(shape), 0
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._f, header)

    def write(self, rows: np.ndarray | torch.Tensor) -> None:
        rows = np.ascontiguousarray(rows.numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.uint8)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise DataError(f"{self.path}: rows {rows.shape} do not fit the array {self.shape} "
                            f"({self.rows} rows written)")
        self._f.write(memoryview(rows.reshape(-1)))
        self.rows += len(rows)

    def close(self) -> OnDiskArray:
        self._f.close()
        if self.rows != self.shape[0]:
            self.discard()
            raise DataError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")
        return OnDiskArray.open(self.tmp)

    def discard(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def stage_npy(path: str | Path, x: torch.Tensor) -> OnDiskArray:
    """An in-memory uint8 tensor written as a `.npy` under NpyWriter's temporary name beside `path`."""
    writer = NpyWriter(path, tuple(x.shape))
    try:
        writer.write(x.detach().cpu().contiguous())
    except BaseException:
        writer.discard()
        raise
    return writer.close()


# ------------------------------------------------------------------------------------ streaming


class _Rows(torch.utils.data.Dataset):
    """Index batch → (positions, uint8 images, labels), read in a DataLoader worker."""

    def __init__(self, split: Split):
        self.x, self.y = split.x, split.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return idx, self.x.take(idx), self.y[idx]


class _EpochBatches(torch.utils.data.Sampler):
    """The current epoch's index batches; set before each pass, so persistent workers serve every epoch."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchStream:
    """Batches of an on-disk split through a DataLoader: `workers` processes read ahead (2 batches each),
    pinned on a GPU, persistent across epochs. Yields the batches in the order given, so a streamed run trains on
    exactly what an in-memory run with the same index batches would."""

    def __init__(self, split: Split, workers: int, pin: bool):
        self.sampler = _EpochBatches()
        self.loader = torch.utils.data.DataLoader(
            _Rows(split), batch_size=None, sampler=self.sampler, num_workers=workers, pin_memory=pin,
            persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)

    def __call__(self, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.sampler.batches = list(batches)
        yield from self.loader


def default_workers(device: torch.device) -> int:
    """DataLoader workers when data.workers is unset. On a GPU every core but one (at most 8) reads ahead while the
    GPU trains. On a CPU none: positioned reads cost little next to a CPU training step, and a worker process
    takes a core from the training threads (one worker on 2 cores ran at 0.74x the in-memory speed,
    bench/streaming.py)."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))
