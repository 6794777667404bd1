"""The ``imgcurator`` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter

import dask

from dask_imgcurator.io.reader import read_webdataset
from dask_imgcurator.io.shards import ShardError, expand_shards, group_samples, scan_members, write_dali_index
from dask_imgcurator.io.writer import OutputExistsError
from dask_imgcurator.pipeline import CurationSummary, mark_kept, write_curated
from dask_imgcurator.progress import run_tasks

#: Exceptions whose message is meant for the user: printed without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ShardError,
    OutputExistsError,
    ValueError,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imgcurator`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted: completed work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except USER_ERRORS + _late_user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _late_user_errors() -> tuple[type[BaseException], ...]:
    """User-facing exceptions of modules that are heavy to import up front."""
    errors: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from dask_imgcurator.models.store import WeightsNotFoundError

        errors.append(WeightsNotFoundError)
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgcurator",
        description="Curate WebDataset image shards on Dask: inspect, re-shard, score and filter.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("inspect", help="count shards, samples, extensions, bytes and errors")
    _add_shards(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per shard instead of a table")
    _add_scheduler(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("reshard", help="copy samples into new shards of exactly N samples")
    _add_shards(p)
    p.add_argument("--out", required=True, help="output directory or fsspec URL")
    p.add_argument("--samples-per-shard", type=int, default=10_000, metavar="N")
    p.add_argument("--rekey", action="store_true", help="rename samples {shard:05d}{index}; old key kept in Parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds another run")
    _add_scheduler(p)
    p.set_defaults(run=cmd_reshard)

    p = sub.add_parser("index", help="write DALI index files (.idx) next to input shards")
    _add_shards(p)
    p.add_argument("--out", help="directory for the .idx files (default: beside each shard)")
    _add_scheduler(p)
    p.set_defaults(run=cmd_index)
    return parser


def _add_shards(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "shards", nargs="+", metavar="SHARDS",
        help="tar files, directories, globs, brace ranges (data/{00000..00099}.tar) or fsspec URLs",
    )


def _add_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", metavar="ADDR", help="address of a running dask scheduler (tcp://host:8786)")


@contextlib.contextmanager
def _maybe_client(address: str | None):
    """Connect to a scheduler when asked; otherwise run on the local threaded scheduler."""
    if not address:
        yield None
        return
    from distributed import Client

    with Client(address) as client:
        print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client


# ----------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    ddf = read_webdataset(args.shards)
    summarise = dask.delayed(_summarise_shard, pure=True)
    with _maybe_client(args.scheduler):
        rows = run_tasks([summarise(part) for part in ddf.to_delayed()], "inspect", progress=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    exts: Counter = Counter()
    print(f"{'shard':60s} {'samples':>8s} {'errors':>7s} {'bytes':>12s}")
    for row in rows:
        exts.update(row["extensions"])
        print(f"{row['shard'][-60:]:60s} {row['samples']:8d} {row['errors']:7d} {row['bytes']:12d}")
        for error in row["first_errors"]:
            print(f"    ! {error}")
    total = {k: sum(r[k] for r in rows) for k in ("samples", "errors", "bytes")}
    print(f"{len(rows)} shards, {total['samples']} samples, {total['errors']} with errors, {total['bytes']} bytes")
    print("extensions: " + ", ".join(f"{ext} {n}" for ext, n in sorted(exts.items())))
    return 0


def _summarise_shard(df) -> dict:
    members = [json.loads(m) for m in df["members"]]
    errors = df["error"].dropna().tolist()
    return {
        "shard": df["shard"].iloc[0] if len(df) else "",
        "samples": int((df["key"] != "").sum()),
        "errors": len(errors),
        "bytes": sum(size for ms in members for _, _, size in ms),
        "extensions": dict(Counter(name.split(".", 1)[-1].lower() for ms in members for name, _, _ in ms)),
        "first_errors": errors[:3],
    }


# ----------------------------------------------------------------------------- reshard


def cmd_reshard(args: argparse.Namespace) -> int:
    ddf = mark_kept(read_webdataset(args.shards))
    with _maybe_client(args.scheduler):
        summary = write_curated(
            ddf, args.out, samples_per_shard=args.samples_per_shard, rekey=args.rekey,
            overwrite=args.overwrite, progress=True,
        )
    return _report(summary, args.out)


def _report(summary: CurationSummary, out: str) -> int:
    print(summary.report())
    print(f"output: {out}/shards (WebDataset), {out}/metadata (Parquet, every sample), {out}/summary.json")
    if not summary.balanced:
        print("error: the counts do not add up; see summary.json", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- index


def cmd_index(args: argparse.Namespace) -> int:
    urls = expand_shards(args.shards)
    write = dask.delayed(_write_input_index, pure=True)
    with _maybe_client(args.scheduler):
        results = run_tasks([write(u, args.out) for u in urls], "index", progress=True)
    for url, problem in zip(urls, results):
        if problem:
            print(f"skipped {url}: {problem}", file=sys.stderr)
    written = sum(1 for r in results if r is None)
    print(f"wrote {written} index files for {len(urls)} shards")
    return 0 if written == len(urls) else 1


def _write_input_index(url: str, out_dir: str | None) -> str | None:
    """Write ``<shard>.idx``; returns why it could not, or None."""
    import posixpath

    from fsspec.core import url_to_fs

    members, refused, error = scan_members(url)
    if error:
        return error
    samples = group_samples(members, refused)
    fs, path = url_to_fs(url)
    target = path[: -len(".tar")] if path.endswith(".tar") else path
    if out_dir:
        fs, root = url_to_fs(out_dir)
        fs.makedirs(root, exist_ok=True)
        target = posixpath.join(root, posixpath.basename(target))
    with fs.open(target + ".idx", "w") as f:
        write_dali_index([s.members for s in samples], f)
    return None


if __name__ == "__main__":
    sys.exit(main())
