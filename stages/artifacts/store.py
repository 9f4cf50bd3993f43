"""The latent store: a Zarr v3 group holding latents in raw encoder space, and how it is written.

Layout::

    STORE.zarr/
      manifest.json          kind, config, inputs, completion (written last)
      zarr.json              group attributes: encoder identity, image size, crop rule, class names
      latents   [N, C, h, w] float16 (or float32), shards of ``shard_size`` samples, one sample per
                             inner chunk (a random read touches one chunk), Blosc-compressed
      labels    [N] int64    class index, -1 when unlabelled
      source_index [N] int64 which source file (index into the manifest's file list)
      flipped   [N] bool     horizontally mirrored copy of that source
      valid     [N] bool     False where the source could not be read (listed in the manifest)
      mean, var [C, h, w] float32   exact statistics over the valid entries (float64 accumulation)
      .blocks/               per-block completion markers with partial statistics (removed when done)

Work is done in *blocks* of ``block_size`` entries, each written by one process: a block is
finished exactly when its marker exists, so a killed run resumes at the first missing block and
``torchrun`` ranks never write the same file. Statistics are accumulated per shard in float64 and
merged in index order (Chan et al.'s parallel update), so they do not depend on the number of
processes, the batch size or the order in which blocks were finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import dist
from ..errors import ArtifactError
from ..progress import console
from .atomic import atomic_write_text, remove_temporaries, atomic_replace
from .manifest import digest_json, has_manifest, read_manifest, write_manifest

CODECS = ("blosc-lz4", "blosc-zstd", "none")
DEFAULT_CODEC = "blosc-zstd"


def make_codec(name: str, itemsize: int, chunk_bytes: int = 0) -> list:
    """Codecs after ``bytes`` for the latents' inner chunks (one entry per chunk of ``chunk_bytes``):
    the compressor, then a CRC32C of the compressed entry, so that a flipped byte anywhere in a shard
    is an error naming the file rather than a silently wrong latent. Measured choice of compressor (README,
    BENCHMARKS.md): Blosc Zstd level 1 with byte shuffle over the whole entry as one Blosc block —
    the best ratio of those tried (1.15x on float16 N(0, 1) latents, where Blosc's default block size
    gives 1.09x and bit-shuffle 1.05x) and the fastest Zstd setting (~2,200 entries/s per core to
    compress, ~3,000 to decompress, on the GPU machine's CPU; bit-shuffle with default blocks: 830)."""
    import zarr.codecs as zc

    if name == "blosc-lz4":
        return [zc.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize, blocksize=chunk_bytes),
                zc.Crc32cCodec()]
    if name == "blosc-zstd":
        return [zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize, blocksize=chunk_bytes),
                zc.Crc32cCodec()]
    if name == "none":
        return [zc.Crc32cCodec()]
    raise ArtifactError(f"unknown codec '{name}'; choose one of: {', '.join(CODECS)}")


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, float64 — mergeable exactly and in any grouping."""
    count: int
    mean: np.ndarray
    m2: np.ndarray

    @staticmethod
    def of(x: np.ndarray) -> "Moments":
        """Moments of the rows of the numpy array ``x`` (float64 math; torch tensors go through
        ``shard_partials``)."""
        x = x.astype(np.float64)
        if len(x) == 0:
            return Moments(0, np.zeros(x.shape[1:]), np.zeros(x.shape[1:]))
        mean = x.sum(axis=0) / len(x)
        return Moments(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    @staticmethod
    def of_shards(x, valid, shard_size: int) -> "Moments":
        """Moments of the valid rows, accumulated shard by shard in order: the same grouping whatever
        the batch size or the number of processes, hence the same bits."""
        if not isinstance(x, np.ndarray):
            return Moments.merge_partials(*(t.cpu().numpy() for t in Moments.shard_partials(x, valid, shard_size)))
        total = Moments(0, np.zeros(tuple(x.shape[1:])), np.zeros(tuple(x.shape[1:])))
        for s in range(0, len(x), shard_size):
            total = total.merge(Moments.of(x[s: s + shard_size][valid[s: s + shard_size]]))
        return total

    @staticmethod
    def shard_partials(x, valid, shard_size: int, group: int = 4):
        """Per shard of ``shard_size`` rows of the torch tensor ``x`` (on any device, in the current
        stream, without a host sync): the count of valid rows, their float64 mean and sum of squared
        deviations — ``count`` [S], ``mean`` and ``m2`` [S, *x.shape[1:]]. Masks by multiplication (no
        boolean indexing, which would wait for the device); ``group`` shards at a time bound memory."""
        import torch

        n, shape = len(x), tuple(x.shape[1:])
        shards = -(-n // shard_size)
        count = torch.zeros(shards, dtype=torch.float64, device=x.device)
        mean = torch.zeros((shards, *shape), dtype=torch.float64, device=x.device)
        m2 = torch.zeros_like(mean)
        for g in range(0, shards, group):
            rows = slice(g * shard_size, min(n, (g + group) * shard_size))
            k = -(-(rows.stop - rows.start) // shard_size)
            xs = x[rows].reshape(rows.stop - rows.start, -1).double()
            w = valid[rows].to(torch.float64)[:, None]
            pad = k * shard_size - len(xs)  # the store's last shard may be short
            if pad:
                xs = torch.cat([xs, xs.new_zeros(pad, xs.shape[1])])
                w = torch.cat([w, w.new_zeros(pad, 1)])
            xs, w = xs.view(k, shard_size, -1), w.view(k, shard_size, 1)
            c = w.sum(1)  # [k, 1]
            mu = (xs * w).sum(1) / c.clamp(min=1)
            count[g: g + k] = c[:, 0]
            mean[g: g + k] = mu.view(k, *shape)
            m2[g: g + k] = ((xs - mu[:, None]) * w).square_().sum(1).view(k, *shape)
        return count, mean, m2

    @staticmethod
    def merge_partials(count, mean, m2) -> "Moments":
        """Merge per-shard partials (``shard_partials``, as numpy) in shard order."""
        total = Moments(0, np.zeros(mean.shape[1:]), np.zeros(mean.shape[1:]))
        for c, mu, sq in zip(count, mean, m2):
            total = total.merge(Moments(int(c), mu, sq))
        return total

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> np.ndarray:  # population variance, as the reference's statistics
        return self.m2 / max(self.count, 1)


_MISSING = np.uint64(2**64 - 1)


def shard_error(path: Path, what: str) -> ArtifactError:
    """A shard file of a finished store is missing or damaged: one line naming it and what to do.
    (A plain ArtifactError, so that it crosses DataLoader worker processes as itself.)"""
    store = next((p for p in Path(path).parents if p.name.endswith(".zarr") or (p / "manifest.json").is_file()),
                 Path(path).parent)
    return ArtifactError(f"{path} {what}: the store {store} is damaged; make it again with the command that "
                         "made it and --overwrite (or restore the file from a copy)")


class ShardIO:
    """Direct reads and writes of the latents' Zarr v3 shards, bypassing Zarr's per-chunk machinery.

    A shard file is the compressed inner chunks back to back, then an index of (offset, nbytes)
    uint64 pairs and its CRC32C (the ``sharding_indexed`` codec with ``index_location: end``). Each
    entry is followed by the CRC32C of its compressed bytes (Zarr's ``crc32c`` codec; stores written
    before 2026-11-30 have none and are read without it). Zarr
    reads what this writes and vice versa (tested); the point is speed: Blosc releases the GIL, so
    shards compress in parallel threads, and a random read is one seek instead of a trip through
    Zarr's async pipeline.
    """

    def __init__(self, array_dir: Path, shape, dtype, shard_size: int, blosc: dict | None, entry_crc: bool = True):
        import numcodecs

        self.dir = array_dir
        self.n, self.sample_shape = int(shape[0]), tuple(int(x) for x in shape[1:])
        self.dtype = np.dtype(dtype)
        self.shard_size = shard_size
        self.codec = None
        if blosc is not None:
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc["shuffle"]]
            self.codec = numcodecs.Blosc(cname=blosc["cname"], clevel=blosc["clevel"], shuffle=shuffle,
                                         blocksize=blosc.get("blocksize", 0))
        self.entry_crc = entry_crc
        self.suffix = "/".join(["0"] * len(self.sample_shape))

    @classmethod
    def for_array(cls, array) -> "ShardIO | None":
        """The fast path for a latents array written by rae (sharded, Blosc or raw); else None."""
        meta = array.metadata.to_dict()
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner = [c["name"] for c in conf["codecs"] if c["name"] != "bytes"]
        if conf.get("index_location", "end") != "end" or inner not in ([], ["blosc"], ["crc32c"], ["blosc", "crc32c"]):
            return None
        if [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"] or conf["chunk_shape"][0] != 1:
            return None
        shard_size = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        path = Path(str(array.store_path.store.root)) / array.store_path.path
        blosc = next((c["configuration"] for c in conf["codecs"] if c["name"] == "blosc"), None)
        return cls(path, array.shape, array.dtype, shard_size, blosc, entry_crc=inner[-1:] == ["crc32c"])

    def _path(self, shard: int) -> Path:
        return self.dir / "c" / str(shard) / self.suffix

    def write_shard(self, shard: int, data: np.ndarray) -> None:
        """Write entries ``shard * shard_size ...`` (``len(data)`` of them, at most a whole shard)."""
        import google_crc32c

        data = np.ascontiguousarray(data, dtype=self.dtype)
        index = np.full((self.shard_size, 2), _MISSING, dtype="<u8")
        parts, offset = [], 0
        for i, chunk in enumerate(data):
            blob = self.codec.encode(chunk) if self.codec is not None else chunk.tobytes()
            parts.append(blob)
            nbytes = len(blob)
            if self.entry_crc:
                parts.append(google_crc32c.value(blob).to_bytes(4, "little"))
                nbytes += 4
            index[i] = (offset, nbytes)
            offset += nbytes
        raw_index = index.tobytes()
        parts += [raw_index, google_crc32c.value(raw_index).to_bytes(4, "little")]
        path = self._path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_replace(path) as tmp, open(tmp, "wb") as f:
            f.writelines(parts)  # part by part: joining 20 MB first would hold the GIL for milliseconds

    def _checked_index(self, f, path: Path) -> np.ndarray:
        """The shard's index, verified: its CRC32C, and every entry inside the file."""
        import google_crc32c

        size, total = self.shard_size * 16, os.fstat(f.fileno()).st_size
        if total < size + 4:
            raise shard_error(path, f"is {total} bytes, shorter than its index (truncated)")
        f.seek(total - size - 4)
        raw, crc = f.read(size), f.read(4)
        if google_crc32c.value(raw).to_bytes(4, "little") != crc:
            raise shard_error(path, "fails its index checksum (corrupt)")
        index = np.frombuffer(raw, dtype="<u8").reshape(self.shard_size, 2)
        written = index[:, 0] != _MISSING
        if (index[written, 0] + index[written, 1] > total - size - 4).any():
            raise shard_error(path, "has entries outside the file (corrupt)")
        return index

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Entries ``indices`` (any order). A missing or damaged shard file is an ``ArtifactError``
        naming it, never zeros or a codec's traceback."""
        import google_crc32c

        out = np.zeros((len(indices), *self.sample_shape), dtype=self.dtype)
        order = np.argsort(indices, kind="stable")
        handle, index, current, path = None, None, -1, None
        try:
            for pos in order:
                i = int(indices[pos])
                shard, within = divmod(i, self.shard_size)
                if shard != current:
                    if handle:
                        handle.close()
                    handle, current = None, shard
                    path = self._path(shard)
                    if not path.is_file():
                        raise shard_error(path, "is missing")
                    handle = open(path, "rb")
                    index = self._checked_index(handle, path)
                if index[within, 0] == _MISSING:
                    continue  # never written: the fill value, as Zarr returns
                offset, nbytes = index[within]
                handle.seek(int(offset))
                blob = handle.read(int(nbytes))
                if self.entry_crc:
                    blob, crc = blob[:-4], blob[-4:]
                    if len(crc) != 4 or google_crc32c.value(blob).to_bytes(4, "little") != crc:
                        raise shard_error(path, f"entry {i} fails its checksum (corrupt)")
                try:
                    raw = self.codec.decode(blob) if self.codec is not None else blob
                    out[pos] = np.frombuffer(raw, dtype=self.dtype).reshape(self.sample_shape)
                except Exception as e:  # a damaged entry: the codec's error, or the wrong size
                    raise shard_error(path, f"entry {i} cannot be decoded ({type(e).__name__}: corrupt)") from None
        finally:
            if handle:
                handle.close()
        return out


class LatentStore:
    """Open a store directory. ``mode="r"`` for readers, ``"r+"`` for the stage that fills it."""

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise ArtifactError(f"{self.path} is not a latent store (no zarr.json)")
        self.group = zarr.open_group(str(self.path), mode=mode)
        try:
            self.latents = self.group["latents"]
            self.labels = self.group["labels"]
            self.source_index = self.group["source_index"]
            self.flipped = self.group["flipped"]
            self.valid = self.group["valid"]
        except KeyError as e:
            raise ArtifactError(f"{self.path} has no {e.args[0]} array: the store is damaged; make it again with "
                                "the command that made it and --overwrite") from None
        n = self.latents.shape[0]
        for name in ("labels", "source_index", "flipped", "valid"):
            if self.group[name].shape != (n,):
                raise ArtifactError(f"{self.path}/{name} has shape {list(self.group[name].shape)}, but the store holds "
                                    f"{n} entries: the store is damaged; make it again with the command that made it "
                                    "and --overwrite")
        self.attrs = dict(self.group.attrs)
        self.block_size = int(self.attrs["block_size"])
        self.shard_size = int(self.attrs["shard_size"])
        self.shards = ShardIO.for_array(self.latents)

    # ---- creation -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, n: int, latent_shape: tuple[int, int, int], dtype: str,
               labels: np.ndarray, source_index: np.ndarray, flipped: np.ndarray, attrs: dict,
               shard_size: int = 64, block_size: int = 1024, codec: str = DEFAULT_CODEC,
               extra_arrays: dict[str, np.ndarray] | None = None) -> "LatentStore":
        import zarr

        if block_size % shard_size:
            raise ArtifactError(f"block size {block_size} must be a multiple of the shard size {shard_size}")
        path = Path(path)
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({**attrs, "shard_size": shard_size, "block_size": block_size, "complete": False})
        c, h, w = latent_shape
        np_dtype = np.dtype(dtype)
        group.create_array("latents", shape=(n, c, h, w), dtype=np_dtype, chunks=(1, c, h, w),
                           shards=(shard_size, c, h, w), compressors=make_codec(codec, np_dtype.itemsize, c * h * w * np_dtype.itemsize),
                           fill_value=0)
        per_entry = {"labels": labels.astype(np.int64), "source_index": source_index.astype(np.int64),
                     "flipped": flipped.astype(bool), **(extra_arrays or {})}
        for name, values in per_entry.items():
            arr = group.create_array(name, shape=(n,), dtype=values.dtype, chunks=(max(min(n, 1 << 16), 1),),
                                     fill_value=0)
            arr[:] = values
        # One chunk per block: each block's validity is written by the single process that owns it.
        group.create_array("valid", shape=(n,), dtype=bool, chunks=(block_size,), fill_value=False)
        (path / ".blocks").mkdir(exist_ok=True)
        return cls(path, mode="r+")

    # ---- blocks (the unit of work, resume and distribution) ----------------------------------
    @property
    def n(self) -> int:
        return int(self.latents.shape[0])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.latents.shape[1:])

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block_size)

    def block_range(self, b: int) -> range:
        return range(b * self.block_size, min((b + 1) * self.block_size, self.n))

    def _marker(self, b: int) -> Path:
        return self.path / ".blocks" / f"{b:08d}.json"

    def block_done(self, b: int) -> bool:
        return self._marker(b).is_file()

    def pending_blocks(self) -> list[int]:
        return [b for b in range(self.num_blocks) if not self.block_done(b)]

    def write_block(self, b: int, latents: np.ndarray, valid: np.ndarray, info: dict | None = None,
                    moments: Moments | None = None) -> None:
        """Write one whole block, then its partial statistics, then its marker (the commit point).

        ``moments``: the block's statistics if the caller computed them already (on the GPU, from
        the values as stored); else they are computed here from ``latents``.
        """
        rng = self.block_range(b)
        assert latents.shape[0] == len(rng) == len(valid)
        latents = latents.astype(self.latents.dtype, copy=False)
        if self.shards is not None:  # whole shards, compressed in parallel threads
            first = rng.start // self.shard_size
            jobs = [(first + k, latents[s: s + self.shard_size])
                    for k, s in enumerate(range(0, len(rng), self.shard_size))]
            list(_pool().map(lambda job: self.shards.write_shard(*job), jobs))
        else:
            self.latents[rng.start: rng.stop] = latents
        self.valid[rng.start: rng.stop] = valid
        # Statistics of what is stored (after the cast to the store's dtype), per shard, in order.
        if moments is None:
            moments = Moments.of_shards(latents, valid, self.shard_size)
        (self.path / ".blocks").mkdir(exist_ok=True)
        np.savez(self.path / ".blocks" / f"{b:08d}.npz", count=np.int64(moments.count), mean=moments.mean, m2=moments.m2)
        atomic_write_text(self._marker(b), json.dumps({"block": b, "valid": int(valid.sum()), **(info or {})}))

    def block_info(self, b: int) -> dict:
        return json.loads(self._marker(b).read_text())

    def finalize_statistics(self) -> Moments:
        """Merge the blocks' partial statistics in block order into ``mean``/``var`` [C, h, w] float32."""
        total = Moments(0, np.zeros(self.latent_shape), np.zeros(self.latent_shape))
        for b in range(self.num_blocks):
            with np.load(self.path / ".blocks" / f"{b:08d}.npz") as z:
                total = total.merge(Moments(int(z["count"]), z["mean"], z["m2"]))
        if total.count == 0:
            raise ArtifactError(f"{self.path}: no valid entries, statistics undefined")
        for name, value in (("mean", total.mean), ("var", total.var)):
            arr = self.group.create_array(name, shape=self.latent_shape, dtype=np.float32,
                                          chunks=self.latent_shape, overwrite=True)
            arr[:] = value.astype(np.float32)
        # Keep the float64 values too: the store can say exactly what it computed.
        np.savez(self.path / "statistics_float64.npz", count=np.int64(total.count), mean=total.mean, var=total.var)
        return total

    def require_all_blocks(self) -> None:
        missing = self.pending_blocks()
        if missing:
            raise ArtifactError(f"{self.path}: {len(missing)} blocks were not written (a rank failed?); "
                                "run the command again")

    def finish(self, **manifest_fields) -> None:
        """The end of a block-wise stage (encode, sample; rank 0, once every block is written): the
        statistics, stale temporaries removed, the store's flag, the manifest marked complete with
        ``manifest_fields`` (the commit point), then the block records. A kill between any two of
        these writes is resumed by running the command again."""
        self.require_all_blocks()
        moments = self.finalize_statistics()
        remove_temporaries(self.path)
        self.mark_complete()
        manifest = read_manifest(self.path, require_complete=False)
        statistics = hashlib.sha256(moments.mean.tobytes() + moments.var.tobytes()).hexdigest()
        manifest.update(manifest_fields, num_valid=int(moments.count),
                        content_id=digest_json({"identity": manifest["identity"], "count": moments.count,
                                                "statistics": statistics}), complete=True)
        write_manifest(self.path, manifest)
        self.drop_block_records()

    def mark_complete(self) -> None:
        """The store's own flag. The block records stay until the manifest says complete (the commit
        point): a kill in between leaves every block done, and the re-run only finalizes again."""
        self.group.attrs["complete"] = True

    def drop_block_records(self) -> None:
        """After the manifest says complete: the per-block records are no longer needed."""
        shutil.rmtree(self.path / ".blocks", ignore_errors=True)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if "mean" not in self.group:
            raise ArtifactError(f"{self.path} has no statistics (unfinished store)")
        return np.asarray(self.group["mean"][:]), np.asarray(self.group["var"][:])

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.valid[:]))

    def read(self, indices) -> np.ndarray:
        """Latents at ``indices`` (sorted or not), one inner chunk per entry."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros((0, *self.latent_shape), dtype=self.latents.dtype)
        if self.shards is not None:  # checked reads: a missing or damaged shard is an error naming it
            return self.shards.read(idx)
        if np.all(np.diff(idx) == 1):
            return np.asarray(self.latents[int(idx[0]): int(idx[-1]) + 1])
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), *self.latent_shape), dtype=self.latents.dtype)
        out[order] = np.asarray(self.latents.get_orthogonal_selection((idx[order],)))
        return out


_POOL = None


def _pool():
    """Threads for shard compression (Blosc releases the GIL)."""
    global _POOL
    if _POOL is None:
        import concurrent.futures as cf

        # A few threads: ~2,200 entries/s each with Zstd-1 on 384 KiB entries; more would only contend
        # for the GIL with the thread that feeds the GPU.
        _POOL = cf.ThreadPoolExecutor(max_workers=min(4, max(2, (os.cpu_count() or 2) // 4)))
    return _POOL


def claim_blocks(out: str | os.PathLike, prepare, d):
    """The start of every block-wise stage (encode, sample): rank 0 creates, reuses or refuses the
    store with ``prepare()`` ("new", "resume" or "done"), every rank then gets the same list of
    unfinished blocks and takes its round-robin share. Returns (state, store or None, my blocks)."""
    def decide():
        state = prepare()
        return state, (LatentStore(out).pending_blocks() if state != "done" else [])

    state, pending = dist.main_decides(decide)
    if state == "done":
        if d.is_main:
            LatentStore(out).drop_block_records()  # left if the run was killed right after finishing
            console.print(f"{out} is already complete; nothing to do.")
        return state, None, []
    return state, LatentStore(out, mode="r+"), dist.shard(pending, d.rank, d.world)


def remove_store(path: str | os.PathLike) -> None:
    """Delete a store for ``--overwrite``, refusing anything that is not a rae artifact."""
    path = Path(path)
    if not path.exists():
        return
    if has_manifest(path) or (path.is_dir() and not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise ArtifactError(f"refusing to overwrite {path}: it exists and is not a rae artifact")


def open_complete_store(path: str | os.PathLike, kind: tuple[str, ...] = ("latent-store", "sample-store")):
    """For downstream stages: the manifest (checked complete) and the opened store."""
    manifest = read_manifest(path, kind=kind, what="latent store")
    return manifest, LatentStore(path, mode="r")
