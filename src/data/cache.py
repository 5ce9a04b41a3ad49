"""Pickle (MulT or MMSA layout, src/data/formats.py) -> validated float32 `.npy` cache, so training can
memory-map the data.

Unpickling a data file costs its whole size in memory (12 GB for unaligned MOSEI) and is slow, and
the features arrive as float64. So the first load validates the file, converts every array to
float32 exactly once and writes one `.npy` per split (every split the file holds) and key into `<pickle>.cache/` (or, when that
folder can't be written, into a per-user cache folder). Later loads only check a small manifest and
memory-map the arrays, so memory no longer grows with the dataset.

The manifest is written last and atomically, and it records the source file's size, mtime and a
fingerprint plus the shape, dtype, byte size and CRC-32 of the values and of the `.npy` header of every
array (the header decides how the values are read: a flipped `fortran_order` transposes them). A cache is
used only when all of that still matches, the checksums included (every array is read once when the
cache is opened; see benchmarks/integrity.py for the cost); a stale one (the pickle changed), a torn
one (a crash mid-write: manifest missing, an array missing or short) or a damaged one (values edited
in place, a flipped bit) is rebuilt, never trusted.

Values: audio `-inf` (present in the real COVAREP features) becomes 0 as in the reference code, and
the count is logged. Any other NaN or +-inf is an error that says where and how many, unless the
caller asked for `clean_nonfinite`, which replaces them with 0.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from ..atomic import remove_stale_temporaries, replacing, write_bytes
from ..locks import lock
from .formats import check_layout, describe_labels, internal_arrays, strings_of, where
from .layout import MODALITIES, STRING_KEYS, DatasetSpec
from .safe_pickle import safe_load
from ..errors import DataError

LOG = logging.getLogger("causalmer.data")

# 2: every array's entry holds the CRC-32 of its values. 3: any splits, either file layout, feature sizes
# from the file, and the CRC-32 of each .npy header (its shape, dtype and memory order). 4: the raw text of a
# file that has it (a cache without it would hide it from the word subsets).
CACHE_FORMAT = 4
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".build.lock"
FINGERPRINT_BLOCK = 1 << 20
# Conversion works on row blocks of about this many bytes, so the temporaries it needs (a float32
# copy and a few masks) stay small whatever the size of the file.
CONVERT_BLOCK_BYTES = 32 << 20
CHECKSUM_BLOCK_BYTES = 8 << 20
CACHE_DIR_ENV = "CAUSALMER_CACHE_DIR"


# --------------------------------------------------------------------------------------------------
# Where the cache lives


def source_fingerprint(path: Path) -> dict:
    """Size, mtime and a sha1 of the first and last MiB: cheap, and catches a replaced file."""
    stat = path.stat()
    digest = hashlib.sha1(str(stat.st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BLOCK))
        if stat.st_size > FINGERPRINT_BLOCK:
            handle.seek(max(FINGERPRINT_BLOCK, stat.st_size - FINGERPRINT_BLOCK))
            digest.update(handle.read(FINGERPRINT_BLOCK))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha1": digest.hexdigest()}


def user_cache_root() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "causalmer"


def cache_locations(pickle_path: Path) -> list[Path]:
    """Candidate cache folders, preferred first: next to the pickle, then the per-user one."""
    pickle_path = Path(pickle_path)
    beside = pickle_path.with_name(pickle_path.name + ".cache")
    key = hashlib.sha1(str(pickle_path.resolve()).encode()).hexdigest()[:16]
    return [beside, user_cache_root() / f"{pickle_path.name}-{key}"]


def _writable_dir(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def data_crc32(path: Path) -> int:
    """CRC-32 of the data of a .npy file (everything after its header), read in blocks."""
    crc = 0
    offset = np.load(path, mmap_mode="r").offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        while block := handle.read(CHECKSUM_BLOCK_BYTES):
            crc = zlib.crc32(block, crc)
    return crc


def header_crc32(path: Path) -> int:
    """CRC-32 of a .npy file's header. The values' checksum does not cover it, yet it decides how they
    are read: `'fortran_order': True` with the same bytes, shape and dtype is another (transposed) array."""
    offset = np.load(path, mmap_mode="r").offset
    with open(path, "rb") as handle:
        return zlib.crc32(handle.read(offset))


def array_file(split: str, key: str) -> str:
    return f"{split}.{key}.npy"


# --------------------------------------------------------------------------------------------------
# The cache a load uses


@dataclass
class CachedData:
    """A validated cache folder and its manifest."""

    directory: Path
    manifest: dict

    @property
    def seq_lens(self) -> tuple[int, int, int]:
        return tuple(self.manifest["seq_lens"])

    @property
    def dims(self) -> tuple[int, int, int]:
        return tuple(self.manifest["dims"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    @property
    def format(self) -> str:
        return self.manifest["layout"]

    def has(self, split: str, key: str) -> bool:
        return f"{split}/{key}" in self.manifest["arrays"]

    def path(self, split: str, key: str) -> Path:
        return self.directory / self.manifest["arrays"][f"{split}/{key}"]["file"]

    def open(self, split: str, key: str) -> np.ndarray:
        """The array as a read-only memory map (nothing is read until it is indexed)."""
        return np.load(self.path(split, key), mmap_mode="r")


def prepare_cache(pickle_path: Path, spec: DatasetSpec, clean_nonfinite: bool = False,
                  data_format: str | None = None) -> CachedData:
    """Return a valid cache for `pickle_path`, building it from the pickle when needed. `data_format`
    ('mult' | 'mmsa') refuses a file of the other layout; None takes the one its keys show."""
    pickle_path = Path(pickle_path)
    fingerprint = source_fingerprint(pickle_path)
    locations = cache_locations(pickle_path)
    for directory in locations:
        manifest = _valid_manifest(directory, spec, fingerprint)
        if manifest is not None:
            _check_insisted_format(manifest, pickle_path, data_format)
            _apply_nonfinite_policy(manifest, pickle_path, clean_nonfinite)
            _log_neg_inf(manifest, logging.DEBUG)
            return CachedData(directory, manifest)

    for directory in locations:
        if _writable_dir(directory):
            break
    else:
        raise DataError(
            f"cannot write the float32 cache for {pickle_path}: neither {locations[0]} nor "
            f"{locations[1]} is writable. Set {CACHE_DIR_ENV} to a writable folder."
        )
    # Several processes may start on a new file at once (DDP ranks, parallel runs): one builds the
    # cache while the others wait for it, then find it valid instead of deleting it under the builder.
    with _exclusive(directory / LOCK_NAME):
        manifest = _valid_manifest(directory, spec, fingerprint)
        if manifest is not None:
            _check_insisted_format(manifest, pickle_path, data_format)
            _apply_nonfinite_policy(manifest, pickle_path, clean_nonfinite)
            _log_neg_inf(manifest, logging.DEBUG)
        else:
            manifest = _build(pickle_path, spec, directory, fingerprint, clean_nonfinite, data_format)
    return CachedData(directory, manifest)


def _check_insisted_format(manifest: dict, path: Path, data_format: str | None) -> None:
    if data_format is not None and manifest["layout"] != data_format:
        raise DataError(f"{path} is {manifest['layout'].upper()}-format, but --data-format {data_format} insists on "
                        f"{data_format.upper()}")


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive advisory lock on lock_path, waiting for it (released when the file is closed on
    exit, or by the OS if the process dies)."""
    with open(lock_path, "a+b") as handle:
        lock(handle, wait=True)
        yield


def _valid_manifest(directory: Path, spec: DatasetSpec, fingerprint: dict) -> dict | None:
    """The manifest of `directory` if the cache there is complete and matches the source, else None."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        if directory.is_dir() and any(directory.glob("*.npy")):
            LOG.info("cache %s has no manifest (an interrupted conversion?); rebuilding it", directory)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        reason = _manifest_mismatch(directory, manifest, spec, fingerprint)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = f"unreadable manifest ({exc})"
    if reason is None:
        return manifest
    LOG.info("cache %s is not usable (%s); rebuilding it", directory, reason)
    return None


def _manifest_mismatch(directory: Path, manifest: dict, spec: DatasetSpec, fingerprint: dict) -> str | None:
    if manifest.get("format") != CACHE_FORMAT:
        return "written by another version of the cache format"
    if manifest.get("dataset") != spec.name:
        return f"built for dataset '{manifest.get('dataset')}'"
    if manifest.get("source") != fingerprint:
        return "the source pickle changed since the cache was built"
    for split in manifest["splits"]:
        for key in MODALITIES + ("labels",):
            if f"{split}/{key}" not in manifest["arrays"]:
                return f"{split}/{key} is not listed"
    for name, entry in manifest["arrays"].items():
        path = directory / entry["file"]
        if not path.is_file():
            return f"{entry['file']} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{entry['file']} has {path.stat().st_size} bytes, expected {entry['bytes']}"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"{entry['file']} is unreadable ({exc})"
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            return f"{entry['file']} holds {array.dtype}{array.shape}, expected {entry['dtype']}{tuple(entry['shape'])}"
        del array
        if header_crc32(path) != entry["header_crc32"]:
            return f"the header of {entry['file']} changed since the cache was built (its memory order, say)"
        # Sizes, shapes and dtypes survive values edited in place or a flipped bit on disk; the checksum doesn't.
        if data_crc32(path) != entry["crc32"]:
            return f"the values in {entry['file']} changed since the cache was built (checksum mismatch)"
    return None


# --------------------------------------------------------------------------------------------------
# Values of the unpickled file


def _check_label_values(labels: np.ndarray, spec: DatasetSpec, path: Path, split: str, key: str) -> None:
    here = where(path, split, key)
    if spec.label_shape == (4, 2):
        # Non-finite labels are left to the non-finite report, which says how to clean them.
        off = ~np.isin(labels, (0.0, 1.0)) & np.isfinite(labels)
        if off.any():
            raise DataError(
                f"{here}: {int(off.sum())} label values are neither 0 nor 1; {spec.name} labels are "
                f"one-hot pairs {describe_labels(spec)}"
            )
        ambiguous = int((labels[..., 0] == labels[..., 1]).sum())
        if ambiguous:
            LOG.warning("%s: %d (absent, present) pairs are not one-hot; argmax reads them as absent",
                        here, ambiguous)
    else:
        bound = spec.score_range
        outside = int((np.abs(labels) > bound).sum())
        if outside:
            LOG.warning("%s: %d sentiment scores lie outside [-%g, %g]; class targets clip them", here, outside,
                        bound, bound)


# --------------------------------------------------------------------------------------------------
# Conversion


def _build(path: Path, spec: DatasetSpec, directory: Path, fingerprint: dict, clean_nonfinite: bool,
           data_format: str | None = None) -> dict:
    LOG.info("converting %s to a float32 cache in %s (once; later runs memory-map it)", path, directory)
    started = time.monotonic()
    layout = check_layout(safe_load(path), spec, path, data_format)

    # The old manifest goes first: from here until the new one is written the folder is torn on
    # purpose, so an interruption can only ever leave a cache that is rebuilt.
    _remove_cache_files(directory)
    arrays: dict[str, dict] = {}
    neg_inf: dict[str, int] = {}
    nonfinite: list[dict] = []
    split_names = list(layout.splits)
    try:
        for split in split_names:
            # Popping hands each split's arrays to this loop alone, so they are freed as soon as
            # they are written instead of living until the whole file is converted.
            part = layout.splits.pop(split)
            for key, source in internal_arrays(part, layout.format, spec):
                target = directory / array_file(split, key)
                entry, counts = _convert(source, target, audio=key == "audio", clean=clean_nonfinite)
                del source
                arrays[f"{split}/{key}"] = entry
                if key == "audio":
                    neg_inf[split] = counts.pop("neg_inf_audio")
                if any(counts.values()):
                    nonfinite.append({"split": split, "key": key, **counts})
                if key not in MODALITIES:
                    _check_label_values(np.load(target, mmap_mode="r"), spec, path, split, key)
            for key in STRING_KEYS:
                values = strings_of(part, key)
                if values is not None:
                    arrays[f"{split}/{key}"] = _write_strings(values, directory / array_file(split, key))
            del part
        if nonfinite and not clean_nonfinite:
            raise DataError(_nonfinite_message(path, nonfinite))
    except BaseException:
        _remove_cache_files(directory)
        raise

    manifest = {
        "format": CACHE_FORMAT,
        "dataset": spec.name,
        "layout": layout.format,
        "source_path": str(path),
        "source": fingerprint,
        "splits": split_names,
        "seq_lens": list(layout.seq_lens),
        "dims": list(layout.dims),
        "arrays": arrays,
        "audio_neg_inf": neg_inf,
        "nonfinite": nonfinite,
        "clean_nonfinite": bool(clean_nonfinite),
    }
    write_bytes(directory / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    LOG.info("cache of %s written in %.1f s", path.name, time.monotonic() - started)
    _log_neg_inf(manifest, logging.INFO)
    if nonfinite:
        LOG.warning("%s", _nonfinite_message(path, nonfinite, cleaned=True))
    return manifest


def _convert(source: np.ndarray, target: Path, audio: bool, clean: bool) -> tuple[dict, dict]:
    """Write `source` as a float32 .npy block by block; return its manifest entry and value counts.

    Written with ordinary writes into space reserved up front, never through a memory map: a full
    disk then fails a write (an OSError, which `replacing` turns into a message and cleans up) instead
    of killing the process with SIGBUS when a mapped page finds no space."""
    counts = {"nan": 0, "pos_inf": 0, "neg_inf": 0, "too_large": 0}
    if audio:
        counts["neg_inf_audio"] = 0
    with replacing(target) as tmp:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                         "shape": tuple(int(n) for n in source.shape)})
            _reserve(handle, int(np.prod(source.shape, dtype=np.int64)) * 4)
            crc = _fill(handle, source, counts, audio, clean)
    entry = {"file": target.name, "shape": list(source.shape), "dtype": "float32",
             "bytes": target.stat().st_size, "crc32": crc, "header_crc32": header_crc32(target)}
    return entry, counts


def _reserve(handle, nbytes: int) -> None:
    """Allocate the file's remaining bytes now, so a disk too small fails before the conversion runs."""
    if nbytes and hasattr(os, "posix_fallocate"):
        handle.flush()
        try:
            os.posix_fallocate(handle.fileno(), handle.tell(), nbytes)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: the writes tell
                raise


def _fill(out, source: np.ndarray, counts: dict, audio: bool, clean: bool) -> int:
    """Convert source into the open file `out` block by block; return the CRC-32 of the values written."""
    crc = 0
    row_bytes = max(1, int(np.prod(source.shape[1:], dtype=np.int64)) * 4)
    step = max(1, CONVERT_BLOCK_BYTES // row_bytes)
    for start in range(0, source.shape[0], step):
        chunk = source[start:start + step]
        with np.errstate(over="ignore", invalid="ignore"):
            block = chunk.astype(np.float32, order="C")  # its bytes in file order, for the CRC
        bad = ~np.isfinite(block)
        if bad.any():
            _count_nonfinite(chunk, block, bad, counts, audio)
            if audio:
                # Reference behaviour: COVAREP's -inf (log of silence) is read as 0.
                block[np.isneginf(chunk)] = 0.0
            if clean:
                block[~np.isfinite(block)] = 0.0
        out.write(block.data)
        crc = zlib.crc32(block.data, crc)
    return crc


def _count_nonfinite(chunk: np.ndarray, block: np.ndarray, bad: np.ndarray, counts: dict, audio: bool) -> None:
    source_nan = int(np.isnan(chunk).sum()) if chunk.dtype.kind == "f" else 0
    source_pos = int(np.isposinf(chunk).sum()) if chunk.dtype.kind == "f" else 0
    source_neg = int(np.isneginf(chunk).sum()) if chunk.dtype.kind == "f" else 0
    counts["nan"] += source_nan
    counts["pos_inf"] += source_pos
    if audio:
        counts["neg_inf_audio"] += source_neg
    else:
        counts["neg_inf"] += source_neg
    # Finite float64 values beyond float32's range turn into +-inf in the conversion.
    counts["too_large"] += int(bad.sum()) - source_nan - source_pos - source_neg


def _nonfinite_message(path: Path, found: list[dict], cleaned: bool = False) -> str:
    names = {"nan": "NaN", "pos_inf": "+inf", "neg_inf": "-inf", "too_large": "beyond float32 range"}
    places = []
    total = 0
    for entry in found:
        parts = [f"{entry[k]} {label}" for k, label in names.items() if entry.get(k)]
        total += sum(entry.get(k, 0) for k in names)
        places.append(f"split '{entry['split']}' key '{entry['key']}': {', '.join(parts)}")
    listing = "; ".join(places)
    if cleaned:
        return f"{path}: replaced {total} non-finite values with 0 as asked ({listing})"
    return (
        f"{path} contains {total} non-finite value{'s' if total != 1 else ''} besides the audio -inf that MulT files are known "
        f"to have ({listing}). Pass clean_nonfinite=True (CLI: --clean-nonfinite) to replace them "
        f"with 0, or repair the file."
    )


def _apply_nonfinite_policy(manifest: dict, path: Path, clean_nonfinite: bool) -> None:
    # A cache built with cleaning on holds zeros where the source has NaN/inf; a later load that did
    # not ask for cleaning must see the same error the source itself would give.
    found = manifest.get("nonfinite") or []
    if found and not clean_nonfinite:
        raise DataError(_nonfinite_message(path, found))


def _log_neg_inf(manifest: dict, level: int) -> None:
    counts = manifest.get("audio_neg_inf", {})
    total = sum(counts.values())
    if total:
        per_split = ", ".join(f"{split} {n}" for split, n in counts.items())
        LOG.log(level, "audio: %d -inf values read as 0, as the reference does (%s)", total, per_split)


def _write_strings(values: np.ndarray, target: Path) -> dict:
    """Store per-sample strings (ids, raw text) as one unicode string per sample (the fields of a row of
    ids joined by '/'; bytes read as UTF-8)."""
    def text(value) -> str:
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return str(value)

    rows = values.reshape(len(values), -1)
    joined = np.array(["/".join(text(v) for v in row) for row in rows.tolist()], dtype=str)
    with replacing(target) as tmp:
        with open(tmp, "wb") as handle:  # a path would get ".npy" appended
            np.save(handle, joined, allow_pickle=False)
    return {"file": target.name, "shape": list(joined.shape), "dtype": str(joined.dtype),
            "bytes": target.stat().st_size, "crc32": data_crc32(target), "header_crc32": header_crc32(target)}


# --------------------------------------------------------------------------------------------------
# Files


def _remove_cache_files(directory: Path) -> None:
    """Delete what a previous conversion left: the manifest first, then arrays and temporaries."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    for path in directory.glob("*.npy"):
        path.unlink(missing_ok=True)
    remove_stale_temporaries(directory)
