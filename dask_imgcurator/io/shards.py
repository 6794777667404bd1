"""Shard specs to URLs, and tar header scans to a per-sample member index.

Only tar headers are read while indexing (payloads are skipped with ``seek``); the small text
members (``.txt`` captions, ``.json``) are read afterwards because they become columns.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import braceexpand
import fsspec
from fsspec.core import url_to_fs

#: Member extensions treated as the sample's image, in order of preference.
DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_GLOB_CHARS = set("*?[")
#: Larger text members are not copied into the dataframe (they stay in the tar).
MAX_TEXT_BYTES = 1 << 20


class ShardError(ValueError):
    """A shard that cannot be read as a tar archive (the message names the file)."""


class RemoteReadError(ConnectionError):
    """A remote file (HTTP, object store) could not be read; the message names it and says why."""


@contextlib.contextmanager
def reading(url: str):
    """Name ``url`` in the errors of remote filesystems, as one picklable error.

    Their own (an HTTP 503 from aiohttp, say) name nothing, and some cannot be pickled back from a
    worker, so that the run would end in a serialisation traceback instead of the reason.
    """
    try:
        yield
        return
    except (ShardError, RemoteReadError):
        raise
    except Exception as exc:
        if _is_local(url_to_fs(url)[0]):
            raise
        if isinstance(exc, FileNotFoundError):
            error: Exception = FileNotFoundError(f"{url}: not found (it was there when the run was planned){_cause(exc)}")
        else:
            error = RemoteReadError(f"{url}: could not be read ({type(exc).__name__}: {exc})")
    try:
        raise error
    except Exception:
        # distributed pickles an error with the ones it was raised during (tblib), and aiohttp's cannot be
        error.__context__ = None
        raise


@dataclass
class Member:
    """One regular file inside a tar: where its payload lives."""

    name: str
    offset: int
    size: int


@dataclass
class SampleIndex:
    """The members of one WebDataset sample, grouped by key."""

    key: str
    members: list[Member] = field(default_factory=list)
    error: str | None = None

    def member(self, ext: str) -> Member | None:
        for m in self.members:
            if split_key(m.name)[1].lower() == ext:
                return m
        return None


def split_key(name: str) -> tuple[str, str]:
    """Split a member name into the WebDataset key and extension (``a/b.seg.png`` → ``a/b``, ``seg.png``)."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext


def unsafe_member_reason(name: str) -> str | None:
    """Why a member name must never be written to disk, or None when it is safe."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"member name {name!r} is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return f"member name {name!r} contains '..'"
    if "\x00" in name:
        return f"member name {name!r} contains a NUL byte"
    return None


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into an ordered list of shard URLs.

    Parameters
    ----------
    spec : str, path-like, or a sequence of them
        A path or fsspec URL, a glob (``data/*.tar``), a brace range (``shard-{00000..00099}.tar``),
        a directory (all ``*.tar`` inside, at any depth, less the output folders of earlier
        imgcurator runs inside it: see below), or a list of any of these.

    Returns
    -------
    list of str
        Local shards as absolute paths, remote ones as full URLs, in the order given (globs and
        directories sorted). A shard named more than once is listed once, where it first appears.

    Raises
    ------
    ValueError
        When no shards are given or a spec (or one of its brace alternatives) is empty.
    FileNotFoundError
        When a path does not exist or a pattern matches nothing. An existing path is taken
        literally even when it contains glob characters (``[2024] set/x.tar``).

    Warns
    -----
    UserWarning
        When a directory holds folders written by an earlier run (``--out`` inside the input
        folder): their shards, the curated copies of the inputs, are left out, so that a run
        does not curate its inputs twice and every run of the same command reads the same
        shards. Name such a folder itself (or a glob) to read its shards.

    Examples
    --------
    >>> expand_shards("memory://nothing-{0..1}.tar")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    FileNotFoundError: no such shard: memory://nothing-0.tar
    """
    return [url for url, _ in expand_shards_versions(spec)]


def expand_shards_versions(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """:func:`expand_shards`, each URL with its :func:`shard_version`, from the same listing."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("no shards given")
    found: dict[str, str] = {}
    for item in specs:
        for one in braceexpand.braceexpand(str(item)):
            if not one.strip():
                # An empty path would glob the whole working directory, recursively.
                raise ValueError(f"empty shard spec in {item!r} (an unset variable?); give a path, glob or URL")
            for url, version in _expand_one(one):
                found.setdefault(url, version)
    return list(found.items())


def _expand_one(url: str) -> list[tuple[str, str]]:
    fs, path = url_to_fs(url)
    # a chained URL (simplecache::s3://...) keeps its chain, so that the workers read through the cache too
    chain = url[: url.rindex("::") + 2] if "::" in url and getattr(fs, "fs", None) is not None else ""

    def named(p: str) -> str:
        return chain + full_url(fs, p)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        if not _GLOB_CHARS & set(path):
            raise FileNotFoundError(f"no such shard: {url}{_cause(exc)}") from None
        found = fs.glob(path, detail=True)
        if not found:
            raise FileNotFoundError(f"pattern {url!r} matched no files") from None
        return [(named(p), listed_version(fs, p, i)) for p, i in sorted(found.items())]
    if info.get("type") == "directory":
        listing = fs.find(path, detail=True)
        found = {p: i for p, i in listing.items() if p.lower().endswith(".tar")}
        for folder in _earlier_outputs(fs, path, listing):
            kept = {p: i for p, i in found.items() if not p.startswith(folder + "/")}
            if len(kept) < len(found):
                warnings.warn(
                    f"leaving out {len(found) - len(kept)} .tar file(s) in {full_url(fs, folder)}, inside the input "
                    f"folder {url}: an imgcurator run wrote them; name that folder to read them", UserWarning, stacklevel=4,
                )
            found = kept
        if not found:
            raise FileNotFoundError(f"directory {url!r} holds no .tar files (outside earlier runs' outputs)")
        return [(named(p), listed_version(fs, p, i)) for p, i in sorted(found.items())]
    if info.get("mimetype") == "text/html" and not path.lower().endswith(".tar"):
        raise FileNotFoundError(
            f"{url} is a web page (text/html), not a tar shard: name the shards on that server with a brace "
            "range (shard-{00000..00099}.tar) or a glob of its links (URL/*.tar)"
        )
    return [(named(path), shard_version(info))]


def _cause(exc: BaseException) -> str:
    """`` (why)`` where a filesystem turned another failure (a refused connection) into "not found"."""
    cause = exc.__cause__
    if cause is None or isinstance(cause, FileNotFoundError):
        return ""
    return f" ({type(cause).__name__}: {cause})"


def listed_version(fs: fsspec.AbstractFileSystem, path: str, listed: dict) -> str:
    """:func:`shard_version` from a listing entry, or from ``info()`` where the listing lacks the fields
    (HTTP index pages give names only): workers compare it with ``info()`` when they read the file."""
    if listed.get("size") is not None and any(listed.get(key) is not None for key in _CONTENT_FIELDS[1:] + _TIME_FIELDS):
        return shard_version(listed)
    return shard_version(fs.info(path))


def _earlier_outputs(fs: fsspec.AbstractFileSystem, root: str, listing: Iterable[str]) -> list[str]:
    """Folders below ``root`` holding the record of a run that wrote shards there (complete or not).

    None where ``root`` holds one itself: the user named a run's output (such as a curation's
    ``OUT``, whose ``shards/`` has its own record), to read it.
    """
    from dask_imgcurator.io.writer import MANIFEST, RUN_MARKER

    root = root.rstrip("/")
    records = [posixpath.split(path) for path in listing if posixpath.basename(path) in (MANIFEST, RUN_MARKER)]
    folders = [folder for folder, name in records if _is_run_record(fs, posixpath.join(folder, name))]
    return [] if root in folders else folders


def _is_run_record(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        record = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "fingerprint" in record


#: Fields of an fsspec ``info()`` that change when a file's content is replaced: content tags
#: (object stores, HTTP headers) and the first of the modification times (``created`` only where nothing else is
#: kept, as in memory://: a local file's ctime moves on chmod and rename too).
_CONTENT_FIELDS = ("size", "ETag", "etag", "md5Hash", "crc32c", "generation", "version_id", "Content-MD5", "Digest")
_TIME_FIELDS = ("mtime", "LastModified", "last_modified", "Last-Modified", "updated", "created")


def shard_version(info: dict) -> str:
    """What identifies a shard's content from its listing: size plus mtime, ETag or the like.

    It goes into a run's fingerprint, so that input shards replaced at the same paths make
    another run (not a resume of the old one), and is checked again when a worker reads the shard.

    >>> shard_version({"name": "a.tar", "size": 10240, "mtime": 1765000000.5, "created": 1.0, "type": "file"})
    'size=10240 mtime=1765000000.5'
    """
    fields = [key for key in _CONTENT_FIELDS if info.get(key) is not None]
    fields += [key for key in _TIME_FIELDS if info.get(key) is not None][:1]
    return " ".join(f"{key}={_plain(info[key])}" for key in fields)


def _plain(value) -> object:
    """A time as seconds since the epoch (listings give datetimes or numbers for the same file)."""
    return value.timestamp() if hasattr(value, "timestamp") else value


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as users write it: plain and canonical for local files, with the protocol otherwise.

    Local paths lose ``.``, ``//`` and ``..`` (the last resolved as the OS does, through links), so
    that one file has one name: a shard is listed once and is known to lie inside an output folder.
    """
    return _canonical_local(path) if _is_local(fs) else fs.unstrip_protocol(path)


def _canonical_local(path: str) -> str:
    if ".." in path.split("/"):
        return os.path.realpath(path)  # "link/.." is where the link points, not the folder holding it
    return posixpath.normpath(path)


def is_inside(url: str, folder: str) -> bool:
    """Whether the file ``url`` lies below ``folder`` (local paths compared with links resolved)."""
    return bool(files_inside([url], folder))


def files_inside(urls: Iterable[str], folder: str) -> list[str]:
    """Those of ``urls`` that lie below ``folder`` (local paths compared with links resolved); the
    folder is resolved once, however many files."""
    folder_fs, folder_path = url_to_fs(folder)
    folder_fs = _target(folder_fs)
    local_folder = _is_local(folder_fs)
    prefix = (os.path.realpath(folder_path) if local_folder
              else full_url(folder_fs, posixpath.normpath(folder_path))).rstrip("/") + "/"
    found = []
    for url in urls:
        fs, path = url_to_fs(url)
        fs = _target(fs)
        if _is_local(fs) != local_folder:
            continue
        where = os.path.realpath(path) if local_folder else full_url(fs, posixpath.normpath(path))
        if where.startswith(prefix):
            found.append(url)
    return found


def _target(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """The filesystem holding the files: the target of a caching layer (``simplecache::``), else ``fs``."""
    while isinstance(getattr(fs, "fs", None), fsspec.AbstractFileSystem):
        fs = fs.fs
    return fs


def files_matching(fs: fsspec.AbstractFileSystem, folder: str, pattern: str) -> list[str]:
    """Files directly in ``folder`` whose name matches ``pattern`` (``fnmatch``), sorted; [] without the folder.

    Unlike ``fs.glob(folder + "/" + pattern)``, glob characters in ``folder`` itself (``run[1]``,
    ``d?``) are taken literally: they name one folder, never its neighbours.
    """
    try:
        listing = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entry["name"] for entry in listing
                  if entry.get("type") == "file" and fnmatch.fnmatchcase(posixpath.basename(entry["name"]), pattern))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def open_shard(url: str, mode: str = "rb"):
    """Open a shard for random access (small blocks for remote stores: indexing seeks a lot)."""
    fs, path = url_to_fs(url)
    if _is_local(fs):
        return fs.open(path, mode)
    return fs.open(path, mode, block_size=1 << 16, cache_type="readahead")


def scan_members(url: str) -> tuple[list[Member], list[tuple[str, str]], str | None]:
    """Scan a tar's headers.

    Returns the regular-file members in archive order, the entries that were refused as
    (name, reason) (non-regular files, a member cut off by truncation), and a shard-level error
    (truncation, a corrupt header, no end-of-archive marker, not a tar) or None.
    """
    with reading(url):
        return _scan_members(url)


def _scan_members(url: str) -> tuple[list[Member], list[tuple[str, str]], str | None]:
    members: list[Member] = []
    refused: list[tuple[str, str]] = []
    last_entry = None
    with open_shard(url) as f:
        size = f.size if hasattr(f, "size") else f.seek(0, 2)
        f.seek(0)
        if size == 0:
            return [], [], f"{url}: empty file (0 bytes), not a tar archive"
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            for info in tar:
                name = _shown_name(info.name)
                last_entry = name
                if info.isdir():
                    continue
                if not info.isfile():
                    refused.append((name, f"{_entry_kind(info)} entries are not supported"))
                    continue
                end = info.offset_data + info.size
                if end > size:
                    problem = (
                        f"truncated tar: member {name!r} declares {info.size} bytes "
                        f"at offset {info.offset_data}, but the file ends at byte {size}"
                    )
                    refused.append((name, problem))
                    return members, refused, f"{url}: {problem}"
                if name != info.name:
                    raw = info.name.encode("utf-8", "surrogateescape")
                    refused.append((name, f"the name is not valid UTF-8 ({raw!r}), which WebDataset keys and Parquet need"))
                    continue
                members.append(Member(info.name, info.offset_data, info.size))
        except tarfile.ReadError as exc:
            where = f" after member {members[-1].name!r}" if members else ""
            if "unexpected end of data" in str(exc):
                kind = "truncated tar"
            else:
                kind = "corrupt tar" if members else "not a tar archive"
            f.seek(0)
            compression = None if members else _compression(f.read(6))
            if compression:
                return members, refused, (
                    f"{url}: not a tar archive but a {compression}-compressed file; images are read from "
                    "shards by offset, so decompress it to a plain .tar first"
                )
            return members, refused, f"{url}: {kind}{where} ({exc})"
        # tarfile stops silently at a bad or cut header past offset 0: only the end-of-archive
        # marker (zero blocks up to the end of the file) shows that nothing was skipped.
        problem = _end_of_archive_problem(f, tar.offset, size)
    if problem:
        where = f" after member {last_entry!r}" if last_entry is not None else ""
        kind, detail = problem
        return members, refused, f"{url}: {kind}{where}: {detail}; anything after it is not read"
    return members, refused, None


#: Magic numbers of the compressions that WebDataset tools write (webdataset reads .tar.gz too).
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression(head: bytes) -> str | None:
    return next((name for magic, name in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def _shown_name(name: str) -> str:
    """A member name as text: bytes that are not UTF-8 (kept by tarfile as surrogates) become U+FFFD."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def _end_of_archive_problem(f, stop: int, size: int) -> tuple[str, str] | None:
    """Why the header scan's stop at byte ``stop`` is not a clean end of archive, as (kind, detail), or None."""
    f.seek(stop)
    block = f.read(tarfile.BLOCKSIZE)
    if not block:
        return "truncated tar", f"the file ends at byte {size} without an end-of-archive marker"
    if block.count(0) != len(block):
        if len(block) < tarfile.BLOCKSIZE:
            return "truncated tar", f"the member header at byte {stop} is cut off by the end of the file at byte {size}"
        return "corrupt tar", f"invalid member header at byte {stop}"
    position = stop + len(block)
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            first = position + len(chunk) - len(chunk.lstrip(b"\0"))
            return "corrupt tar", f"non-zero data at byte {first} after the zero block at byte {stop} (a zeroed header?)"
        position += len(chunk)
    return None


def _entry_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return "special"


def group_samples(
    members: Iterable[Member],
    refused: Iterable[tuple[str, str]] = (),
    image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
) -> list[SampleIndex]:
    """Group consecutive members by key, the WebDataset way, and flag what cannot be used.

    A later group that repeats an earlier key, two members with one extension, a missing image,
    an unsafe name and a refused (non-regular) entry each set ``error`` on the sample.
    """
    samples: list[SampleIndex] = []
    first_seen: dict[str, int] = {}
    for m in members:
        key, _ = split_key(m.name)
        if not samples or samples[-1].key != key:
            samples.append(SampleIndex(key))
            if key in first_seen:
                samples[-1].error = (
                    f"duplicate key {key!r}: it also appears in sample #{first_seen[key]} of this shard"
                )
            else:
                first_seen[key] = len(samples) - 1
        samples[-1].members.append(m)
    for name, reason in refused:
        key, _ = split_key(name)
        target = samples[first_seen[key]] if key in first_seen else None
        if target is None:
            target = SampleIndex(key)
            samples.append(target)
            first_seen[key] = len(samples) - 1
        target.error = target.error or f"member {name!r}: {reason}"
    image_extensions = tuple(e.lower() for e in image_extensions)
    for sample in samples:
        if sample.error:
            continue
        sample.error = _sample_problem(sample, image_extensions)
    return samples


def _sample_problem(sample: SampleIndex, image_extensions: tuple[str, ...]) -> str | None:
    if not posixpath.basename(sample.key):
        names = ", ".join(repr(m.name) for m in sample.members[:3])
        return f"no key: the member name(s) {names} begin with a dot, so WebDataset readers cannot group them into a sample"
    seen: set[str] = set()
    for m in sample.members:
        reason = unsafe_member_reason(m.name)
        if reason:
            return reason
        ext = split_key(m.name)[1].lower()
        if ext in seen:
            return f"sample has two {ext!r} members"
        seen.add(ext)
    if not any(e in seen for e in image_extensions):
        found = ", ".join(sorted(seen)) or "none"
        return f"no image member (extensions found: {found})"
    return None


def image_member(sample: SampleIndex, image_extensions: Sequence[str]) -> Member | None:
    """The sample's image member: the first of ``image_extensions`` that it has."""
    for ext in image_extensions:
        found = sample.member(ext.lower())
        if found is not None:
            return found
    return None


def read_ranges(url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Read ``(offset, size)`` byte ranges from one file, visiting offsets in ascending order."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    out: list[bytes] = [b""] * len(ranges)
    with reading(url), open_shard(url) as f:
        for i in order:
            offset, size = ranges[i]
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ShardError(f"{url}: expected {size} bytes at offset {offset}, got {len(data)}")
            out[i] = data
    return out


def write_dali_index(samples: Sequence[Sequence[Member]], out) -> None:
    """Write a DALI webdataset index (``wds2idx`` format v1.2) for samples given as member lists.

    ``out`` is a text file object. Each line lists ``ext offset size name`` per member, where
    ``offset`` is the payload offset in the tar.
    """
    out.write(f"v1.2 {len(samples)}\n")
    for members in samples:
        parts = []
        for m in members:
            if any(c.isspace() for c in m.name):
                raise ValueError(f"member name {m.name!r} contains white space; DALI index files cannot hold it")
            parts.append(f"{split_key(m.name)[1]} {m.offset} {m.size} {m.name}")
        out.write(" ".join(parts) + "\n")
