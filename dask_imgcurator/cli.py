"""The ``imgcurator`` command line."""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import posixpath
import signal
import sys
import threading
from collections import Counter

import dask
from fsspec.core import url_to_fs

from dask_imgcurator.decode.base import DEFAULT_MAX_PIXELS
from dask_imgcurator.io.reader import read_webdataset, shard_error_rows
from dask_imgcurator.io.shards import (
    ShardError,
    expand_shards,
    files_matching,
    full_url,
    files_inside,
    group_samples,
    scan_members,
    write_dali_index,
)
from dask_imgcurator.io.writer import OutputExistsError, write_atomic
from dask_imgcurator.pipeline import CurationSummary, check_curated_output, mark_kept, write_curated
from dask_imgcurator.progress import counted, run_tasks

#: Exceptions whose message is meant for the user: printed without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
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
    previous = _stop_on_signals()
    try:
        with _warnings_as_lines():
            return args.run(args) or 0
    except KeyboardInterrupt:
        _ignore_half_made_futures()
        print("\ninterrupted: completed work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except USER_ERRORS + _late_user_errors() as exc:
        print(f"error: {str(exc) or repr(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if "install" not in str(exc).lower():  # a broken installation: the traceback is what helps
            raise
        print(f"error: {exc}", file=sys.stderr)  # "Install s3fs to access S3": an optional package missing
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _warnings_as_lines():
    """Print warnings meant for the user as ``warning: ...`` lines, like errors (no source file and line).

    Deprecation notices, which are for developers, keep Python's format.
    """
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            return previous(message, category, filename, lineno, file, line)
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _ignore_half_made_futures() -> None:
    """Keep quiet a distributed ``Future`` that the interrupt cut off inside its ``__init__``.

    Its ``__del__`` then fails on the attributes ``__init__`` never set, and Python prints that
    as "Exception ignored ... Traceback" after our one-line message; the future held nothing.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        where = unraisable.object
        if (isinstance(unraisable.exc_value, AttributeError) and getattr(where, "__qualname__", "") == "Future.__del__"
                and getattr(where, "__module__", "").startswith("distributed")):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _positive_int(text: str) -> int:
    """argparse type of counts (workers, threads, batch size, ...): 0 or less is a usage error, not "default"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _given(text: str) -> str:
    """argparse type of paths and addresses: an empty one (an unset shell variable) would mean "here"
    or "start a cluster" instead of an error."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty (an unset variable?); give a path, URL or address")
    return text


def _dashboard_address(text: str) -> str:
    """argparse type of --dashboard: ``[HOST]:PORT`` (or just PORT), checked before a cluster starts on it."""
    port = text.rpartition(":")[2]
    if text and not (port.isdigit() and int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"expected [HOST]:PORT with a port from 0 to 65535 (e.g. :8787), got {text!r}")
    return text


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C and SIGTERM until the block is done, then stop as they would have.

    A cluster interrupted halfway through its start is left to distributed's exit handler, which
    fails on it with a traceback; once started, the cluster closes cleanly on the way out. Worker
    processes started in the block never receive Ctrl-C (see below).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame):
        if not received:
            print("\nstopping once the cluster has started ...", file=sys.stderr)
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Ctrl-C reaches the terminal's whole process group, worker processes included: with SIGINT
    # blocked here, the threads started in the block (distributed's event loop) and the worker
    # processes they spawn inherit the blocked mask and never get it (they printed KeyboardInterrupt
    # tracebacks from their imports, and the run exited 1); this process stops them cleanly instead
    block = hasattr(signal, "pthread_sigmask")
    if block:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # started later, it would unblock SIGINT in the thread that starts it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if block:
            if signal.sigtimedwait({signal.SIGINT}, 0) is not None:  # a Ctrl-C held meanwhile
                hold(signal.SIGINT, None)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted


def _print_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help(sys.stderr)
    return 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by this CLI's own handlers.

    Not a bare KeyboardInterrupt: Python 3.11 marks the process as killed by Ctrl-C when one
    goes through code that a C extension runs as a string (optree imports modules that way),
    even when it is caught, and the run then exited by SIGINT (-2) instead of with status 130.
    """


def _interrupt(signum, frame):
    raise Interrupted


def _stop_on_signals() -> dict:
    """Make Ctrl-C and SIGTERM (a scheduler's preemption, ``kill``) raise :class:`Interrupted`, which
    stops a run cleanly and resumably. Returns the handlers replaced, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


def _late_user_errors() -> tuple[type[BaseException], ...]:
    """User-facing exceptions of modules that are heavy to import up front."""
    errors: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from dask_imgcurator.models.store import UnsafeWeightsError, WeightsNotFoundError

        errors += [WeightsNotFoundError, UnsafeWeightsError]
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
    p.add_argument("--out", type=_given, required=True, help="output directory or fsspec URL")
    p.add_argument("--samples-per-shard", type=_positive_int, default=10_000, metavar="N")
    p.add_argument("--rekey", action="store_true", help="rename samples {shard:05d}{index}; old key kept in Parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds another run")
    _add_scheduler(p)
    p.set_defaults(run=cmd_reshard)

    p = sub.add_parser("curate", help="embed, score, filter and write curated shards + Parquet metadata")
    _add_shards(p)
    _add_curate_options(p)
    p.set_defaults(run=cmd_curate)

    p = sub.add_parser("demo", help="offline end-to-end run on generated shards with a tiny random model")
    p.add_argument("--out", type=_given, default="imgcurator-demo", help="directory for the demo (default: ./imgcurator-demo)")
    p.add_argument("--shards", type=_positive_int, default=4, help="number of demo shards (default 4)")
    p.add_argument("--samples", type=_positive_int, default=32, help="samples per demo shard (default 32)")
    p.add_argument("--workers", type=_positive_int, default=1, help="local worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("models", help="list available models, or download them into a model dir")
    p.set_defaults(run=functools.partial(_print_usage, p))  # no ACTION: this command's usage, not the top's
    models_sub = p.add_subparsers(metavar="ACTION")
    q = models_sub.add_parser("list", help="show known CLIP models and heads and where they are present")
    q.add_argument("--model-dir", type=_given, help="model directory to look in (besides the cache)")
    q.set_defaults(run=cmd_models_list)
    q = models_sub.add_parser("download", help="download a CLIP model and its heads into a model dir")
    q.add_argument("--model-dir", type=_given, required=True, help="directory to fill; copy it to offline machines")
    q.add_argument("--model", default="ViT-L-14/openai", help="CLIP model (default ViT-L-14/openai)")
    q.add_argument("--heads", default="aesthetic,nsfw", help="comma-separated heads (default aesthetic,nsfw)")
    q.set_defaults(run=cmd_models_download)

    p = sub.add_parser("report", help="write an HTML report of a run: counts, score plots, thumbnails, failures")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory of a curate or reshard run")
    p.add_argument("--out", type=_given, metavar="PATH", help="HTML file to write, or a directory to write report.html in (default: OUT_DIR/report.html)")
    p.add_argument("--thumbnails", type=int, default=12, metavar="N",
                   help="kept and filtered samples to show, each (default 12; 0 for none)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("index", help="write DALI index files (.idx) next to input shards")
    _add_shards(p)
    p.add_argument("--out", type=_given, help="directory for the .idx files (default: beside each shard)")
    _add_scheduler(p)
    p.set_defaults(run=cmd_index)
    return parser


def _add_shards(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "shards", nargs="+", metavar="SHARDS",
        help="tar files, directories, globs, brace ranges (data/{00000..00099}.tar) or fsspec URLs",
    )


def _add_curate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=_given, required=True, help="output directory or fsspec URL")
    p.add_argument(
        "--filter", action="append", metavar="EXPR",
        help='keep rows matching EXPR, e.g. "aesthetic_score >= 5 and nsfw_score < 0.5" (repeat to AND)',
    )
    p.add_argument("--model", default="ViT-L-14/openai", help="CLIP model: NAME/TAG, hf-hub:ORG/REPO, a model dir, or a checkpoint file as ARCH/PATH "
                        "(ViT-B-32//data/ft.pt; a bare checkpoint path means ViT-L-14)")
    p.add_argument("--model-dir", type=_given, help="prepared model directory (see `imgcurator models download`)")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--heads", default="aesthetic,nsfw", help="comma-separated score heads (default aesthetic,nsfw)")
    p.add_argument("--samples-per-shard", type=_positive_int, default=10_000, metavar="N")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="images per model batch (default 32 CPU, 256 GPU)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--decoder", choices=("auto", "dali", "pillow"), default="auto")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (bomb guard)")
    p.add_argument(
        "--no-draft", dest="draft", action="store_false",
        help="decode every JPEG at full size (default: JPEGs of 4x the model's input or more are decoded at "
        "1/2-1/8 scale, faster and within 0.13 of open_clip's pixels)",
    )
    p.add_argument("--rekey", action="store_true", help="rename samples {shard:05d}{index}; old key kept in Parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds another run")
    p.add_argument("--report", action="store_true", help="also write OUT/report.html (see `imgcurator report`)")
    _add_cluster_options(p)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "where it runs",
        "Defaults also come from dask's config under 'imgcurator:' (see dask_imgcurator/imgcurator.yaml) "
        "and from DASK_IMGCURATOR__SECTION__KEY environment variables; these options win.",
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster", choices=("auto", "local", "cuda", "slurm"), default=None,
        help="start a cluster: auto (default) = cuda when GPUs are visible, else local; local = CPU worker "
             "processes; cuda = one worker per GPU (dask-cuda); slurm = workers in SLURM jobs (dask-jobqueue)",
    )
    where.add_argument("--scheduler", type=_given, metavar="ADDR", help="use a running dask scheduler (tcp://host:8786) instead")
    g.add_argument("--workers", type=_positive_int, metavar="N", help="local worker processes (default: one per core where memory allows, at most one per input shard; or one per GPU)")
    g.add_argument("--torch-threads", type=_positive_int, metavar="N", help="torch threads per worker (default: its share of the cores)")
    g.add_argument(
        "--dashboard", nargs="?", const="", default=None, metavar="[HOST]:PORT", type=_dashboard_address,
        help="serve the dask dashboard at this address (e.g. :8787; the link is always printed)",
    )
    g.add_argument("--cluster-config", type=_given, metavar="FILE", help="YAML file of 'imgcurator:' settings (like imgcurator.yaml)")
    s = p.add_argument_group("SLURM (with --cluster slurm)")
    s.add_argument("--slurm-queue", metavar="PARTITION", help="partition (#SBATCH -p)")
    s.add_argument("--slurm-account", metavar="ACCOUNT", help="#SBATCH -A")
    s.add_argument("--slurm-jobs", type=_positive_int, metavar="N", help="jobs to submit (default 1)")
    s.add_argument("--slurm-adapt", metavar="MIN:MAX", help="adapt the number of jobs to the work instead")
    s.add_argument("--slurm-cores", type=_positive_int, metavar="N", help="CPUs per job (default 8)")
    s.add_argument("--slurm-memory", metavar="SIZE", help="memory per job (default 32GiB)")
    s.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per job (--gres=gpu:N), one worker each")
    s.add_argument("--slurm-walltime", metavar="HH:MM:SS", help="job time limit (default 01:00:00)")
    s.add_argument("--slurm-prologue", action="append", metavar="LINE", help="shell line run before the workers (repeat)")
    s.add_argument("--slurm-directive", action="append", metavar="OPTION", help="extra #SBATCH option (repeat)")
    s.add_argument("--slurm-local-directory", metavar="DIR", help="worker scratch on the nodes (default ${TMPDIR:-/tmp})")
    s.add_argument("--slurm-log-directory", metavar="DIR", help="job stdout/stderr files")


def _add_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", type=_given, metavar="ADDR", help="address of a running dask scheduler (tcp://host:8786)")


@contextlib.contextmanager
def _maybe_client(address: str | None, paths: list[str]):
    """Connect to a scheduler when asked (refusing ``paths`` its workers cannot share, see
    :func:`_check_shared_paths`); otherwise run on the local threaded scheduler."""
    if not address:
        yield None
        return
    _check_shared_paths(paths)
    with _connect(address) as client:
        print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client


def _connect(address: str):
    """A client of the scheduler at ``address``; a scheduler that cannot be reached is a user error."""
    from distributed import Client

    try:
        return Client(address)
    except OSError as exc:  # distributed raises OSError("Timed out trying to connect ...")
        raise ConnectionError(f"cannot reach the dask scheduler at {address}: {exc}") from None


#: CLI option -> slurm_cluster() keyword.
SLURM_OPTIONS = {
    "slurm_queue": "queue", "slurm_account": "account", "slurm_jobs": "jobs", "slurm_cores": "cores",
    "slurm_memory": "memory", "slurm_gpus": "gpus", "slurm_walltime": "walltime",
    "slurm_prologue": "job_script_prologue", "slurm_directive": "job_extra_directives",
    "slurm_local_directory": "local_directory", "slurm_log_directory": "log_directory",
}


@contextlib.contextmanager
def _curation_client(args: argparse.Namespace, partitions: int | None = None):
    """The client for model work: the given scheduler, or a new cluster (--cluster, config).

    A local CPU cluster gets no more default workers than ``partitions`` (input shards).
    """
    from distributed import Client

    from dask_imgcurator import config

    opt = lambda name: getattr(args, name, None)  # noqa: E731  (demo's Namespace lacks most options)
    with contextlib.ExitStack() as stack:
        stack.push(_log_levels_kept_after_success())  # runs last: main() called from Python logs as before
        if opt("cluster_config"):
            stack.enter_context(config.use_config_file(opt("cluster_config")))
        if opt("scheduler"):
            client = stack.enter_context(_connect(opt("scheduler")))
        else:
            from dask_imgcurator.cluster import QuietTaskFailures, make_cluster

            kind = config.get("cluster.kind", opt("cluster"))
            with _interrupts_deferred():
                cluster = stack.enter_context(make_cluster(kind, **_cluster_kwargs(args, kind, partitions)))
                client = stack.enter_context(Client(cluster))
                client.register_plugin(QuietTaskFailures())  # main() prints a failed task's error
            if kind == "slurm":
                # No wait_for_workers here: an adaptive cluster starts jobs only once there is work.
                print(f"SLURM cluster started; the work begins when its jobs ({cluster.job_name}) are running",
                      file=sys.stderr)
        print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        # runs first when the block exits; the workers of a cluster we started print to our terminal too
        stack.push(functools.partial(_quiet_teardown, None if opt("scheduler") else client))
        yield client


def _quiet_teardown(client, exc_type, exc, tb) -> bool:
    """Keep distributed's shutdown noise off the terminal once the run is over: in this process (a
    nanny's "Worker process still alive after 4.0 seconds, killing" even after a run that succeeded)
    and, on Ctrl-C/SIGTERM or an error (cancelled tasks), in the workers and nannies of ``client``
    (the cluster this run started). main() reports the stop or the error itself."""
    _silence_distributed_logs()
    if exc_type is not None:
        if client is not None:
            for nanny in (False, True):
                with contextlib.suppress(Exception):  # best effort: a worker may be gone already
                    client.run(_silence_distributed_logs, nanny=nanny)
    return False


#: Loggers that _quiet_teardown silences.
_NOISY_LOGGERS = ("distributed", "tornado.application", "asyncio")


def _silence_distributed_logs() -> None:
    import logging

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _log_levels_kept_after_success():
    """An exit callback that gives the noisy loggers their levels back once a run ended well (after an
    error or a stop the process is about to end, and late shutdown messages stay quiet)."""
    import logging

    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}

    def restore(exc_type, exc, tb) -> bool:
        if exc_type is None:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        return False

    return restore


def _cluster_kwargs(args: argparse.Namespace, kind: str, partitions: int | None = None) -> dict:
    """Keyword arguments of make_cluster() from the CLI options that were given (and the input's shards)."""
    opt = lambda name: getattr(args, name, None)  # noqa: E731
    kwargs = {"torch_threads": opt("torch_threads"), "dashboard_address": opt("dashboard") or None}
    slurm = {key: opt(name) for name, key in SLURM_OPTIONS.items() if opt(name) is not None}
    if kind != "slurm":
        if slurm or opt("slurm_adapt"):
            raise ValueError("--slurm-* options need --cluster slurm (or imgcurator.cluster.kind: slurm)")
        return {**kwargs, "n_workers": opt("workers"), "max_workers": partitions or None}
    if opt("workers"):
        raise ValueError("--workers is for local clusters; with --cluster slurm use --slurm-jobs or --slurm-adapt")
    if opt("slurm_adapt"):
        low, sep, high = opt("slurm_adapt").partition(":")
        if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high)):
            raise ValueError(f"--slurm-adapt wants MIN:MAX job counts such as 0:8, not {opt('slurm_adapt')!r}")
        slurm.update(adapt=True, minimum_jobs=int(low), maximum_jobs=int(high))
    return {**kwargs, **slurm}


# ----------------------------------------------------------------------------- curate


def cmd_curate(args: argparse.Namespace) -> int:
    from dask_imgcurator.models import ClipRef

    source = ClipRef.parse(args.model, model_dir=args.model_dir, offline=True if args.offline else None)
    return _curate(args, source)


def _curate(args: argparse.Namespace, source) -> int:
    from dask_imgcurator.models.manage import check_weights
    from dask_imgcurator.stages.embed import embed
    from dask_imgcurator.stages.filters import drop_reason, parse_filters

    _check_cluster_options(args)  # the options first, before weights, shard listings or a cluster
    _check_precision(args)
    _check_shared_paths([*args.shards, args.out])
    filt = parse_filters(args.filter) if args.filter else None
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    check_weights(source, heads)
    ddf = read_webdataset(_input_shards(args.shards, args.out))
    ddf = embed(
        ddf, source, heads=heads, batch_size=args.batch_size,
        precision=args.precision, decoder=args.decoder, max_pixels=args.max_pixels, draft=args.draft,
    )
    if filt is not None:
        filt.validate(ddf._meta)
        ddf = mark_kept(ddf, filt.mask(ddf), drop_reason(ddf, filt))
    else:
        ddf = mark_kept(ddf)
    _check_output(ddf, args)  # before a cluster starts
    with _curation_client(args, partitions=ddf.npartitions):
        summary = write_curated(
            ddf, args.out, samples_per_shard=args.samples_per_shard, rekey=args.rekey,
            overwrite=args.overwrite, progress=True,
        )
    status = _report(summary, args.out)
    if args.report:
        from dask_imgcurator.report import write_report

        print(f"report: {write_report(args.out)}")
    return status


def cmd_report(args: argparse.Namespace) -> int:
    from dask_imgcurator.report import write_report

    print(f"report: {write_report(args.out_dir, args.out, thumbnails=args.thumbnails)}")
    return 0


# ----------------------------------------------------------------------------- demo

#: Thresholds that split the demo data; the tiny model's scores are random but deterministic.
DEMO_FILTER = "aesthetic_score >= 5.078 and nsfw_score < 0.5102"


#: The demo's parameters, next to its input shards.
DEMO_RECORD = "demo.json"


def cmd_demo(args: argparse.Namespace) -> int:
    from dask_imgcurator.demo_data import make_demo_shards
    from dask_imgcurator.models import make_tiny_model_dir

    root = args.out.rstrip("/")
    params = {"shards": args.shards, "samples": args.samples}
    shards = _claim_demo_input(f"{root}/input", params, args.overwrite)
    if shards:
        print(f"using the demo shards already in {root}/input ({args.shards} x {args.samples} images)")
    else:
        print(f"generating {args.shards} demo shards of {args.samples} photo-like images in {root}/input"
              " (plus two broken samples, to show how failures are reported) ...")
        shards = make_demo_shards(f"{root}/input", n_shards=args.shards, samples_per_shard=args.samples, broken=True)
        _record_demo_input(f"{root}/input", params)
    ref = make_tiny_model_dir(f"{root}/models")
    print(f"tiny random-weight CLIP model and heads written to {root}/models (loaded like real weights)")
    print("NOTE: demo scores come from RANDOM weights and mean nothing; for real scores run\n"
          "      imgcurator curate SHARDS --out DIR --model ViT-L-14/openai")
    curate_args = argparse.Namespace(
        shards=shards, out=f"{root}/curated", filter=[DEMO_FILTER], heads="aesthetic,nsfw",
        samples_per_shard=max(1, args.shards * args.samples // 3), batch_size=None, precision="fp32",
        decoder="auto", max_pixels=DEFAULT_MAX_PIXELS, draft=True, rekey=False, overwrite=args.overwrite,
        scheduler=None, workers=args.workers, report=True,
    )
    print(f"curating with filter: {DEMO_FILTER}")
    return _curate(curate_args, ref)


def _claim_demo_input(folder: str, params: dict, overwrite: bool) -> list[str]:
    """The shards of a complete demo input of ``params`` in ``folder``, to use again, else [].

    A demo input of other parameters is refused (unless ``overwrite``: then its demo shards are
    removed), and so is reused with ``overwrite`` (a fresh demo). Without this a demo of other
    sizes rewrote the input of an earlier demo's curated run before that run's output refused it,
    a smaller demo also read the earlier demo's extra shards, and the same demo run again rewrote
    its input, whose new modification times made it another run than the one it should resume.
    """
    from dask_imgcurator.demo_data import demo_shard_paths

    fs, path = url_to_fs(folder)
    record = posixpath.join(path, DEMO_RECORD)
    previous = json.loads(fs.cat_file(record)) if fs.exists(record) else None
    if previous is None or (previous == params and not overwrite):
        shards = demo_shard_paths(folder, params["shards"])
        return shards if previous is not None and all(fs.exists(s) for s in shards) else []
    if previous != params and not overwrite:
        raise OutputExistsError(
            f"{folder} holds a demo of {previous['shards']} shards x {previous['samples']} samples; pass "
            f"--overwrite to replace it with {params['shards']} x {params['samples']}, or choose another --out"
        )
    fs.rm(record)  # the input is incomplete until it is recorded again
    for shard in files_matching(fs, path, "demo-*.tar"):
        fs.rm(shard)
    return []


def _record_demo_input(folder: str, params: dict) -> None:
    """Mark ``folder`` as holding the complete demo input of ``params`` (after its shards are written)."""
    fs, path = url_to_fs(folder)
    write_atomic(fs, posixpath.join(path, DEMO_RECORD), json.dumps(params).encode())


# ----------------------------------------------------------------------------- models


def cmd_models_list(args: argparse.Namespace) -> int:
    from dask_imgcurator.models import list_models

    rows = list_models(model_dir=args.model_dir)
    title = "model (clip: pass as --model)"
    width = max([len(title)] + [len(row.model or row.name) for row in rows])
    print(f"{'kind':6s} {title:{width}s} {'dim':>5s}  location / source")
    for row in rows:
        where = row.location or f"(not present; downloads from {row.source})"
        print(f"{row.kind:6s} {row.model or row.name:{width}s} {row.embed_dim or '':>5}  {where}")
    if args.model_dir and not _exists(args.model_dir):
        print(f"note: --model-dir {args.model_dir} does not exist; nothing was listed from it", file=sys.stderr)
    elif args.model_dir:
        print(f"local models need --model-dir {args.model_dir} beside --model")
    return 0


def _exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def cmd_models_download(args: argparse.Namespace) -> int:
    from dask_imgcurator.models import download_models
    from dask_imgcurator.models.store import is_offline

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if is_offline():
        print("note: HF_HUB_OFFLINE or IMGCURATOR_OFFLINE is set, so nothing is downloaded: only weights already "
              f"in {args.model_dir} count (unset it to download)", file=sys.stderr)
    for path in download_models(args.model_dir, args.model, heads):
        print(f"ready: {path}")
    print(f"use it with: imgcurator curate SHARDS --out DIR --model {args.model} --model-dir {args.model_dir} --offline")
    return 0


# ----------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    ddf = read_webdataset(args.shards)
    summarise = dask.delayed(_summarise_shard, pure=True)
    with _maybe_client(args.scheduler, args.shards):
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
    total = {k: sum(r[k] for r in rows) for k in ("samples", "errors", "shard_errors", "bytes")}
    unreadable = sum(1 for r in rows if r["shard_errors"])
    shards = counted(len(rows), "shard") + (f" ({unreadable} unreadable)" if unreadable else "")
    print(f"{shards}, {counted(total['samples'], 'sample')}, {total['errors']} with errors, {total['bytes']} bytes")
    print("extensions: " + ", ".join(f"{ext} {n}" for ext, n in sorted(exts.items())))
    return 0


def _summarise_shard(df) -> dict:
    members = [json.loads(m) for m in df["members"]]
    errors = df["error"].dropna().tolist()
    samples = ~shard_error_rows(df["key"], df["members"])
    return {
        "shard": df["shard"].iloc[0] if len(df) else "",
        "samples": int(samples.sum()),
        "errors": int(df.loc[samples, "error"].notna().sum()),
        "shard_errors": int(df.loc[~samples, "error"].notna().sum()),
        "bytes": sum(size for ms in members for _, _, size in ms),
        "extensions": dict(Counter(name.split(".", 1)[-1].lower() for ms in members for name, _, _ in ms)),
        "first_errors": errors[:3],
    }


# ----------------------------------------------------------------------------- reshard


def cmd_reshard(args: argparse.Namespace) -> int:
    ddf = mark_kept(read_webdataset(_input_shards(args.shards, args.out)))
    _check_output(ddf, args)
    with _maybe_client(args.scheduler, [*args.shards, args.out]):
        summary = write_curated(
            ddf, args.out, samples_per_shard=args.samples_per_shard, rekey=args.rekey,
            overwrite=args.overwrite, progress=True,
        )
    return _report(summary, args.out)


def _check_shared_paths(paths: list[str]) -> None:
    """Refuse paths that worker processes cannot share with this one (``memory://``)."""
    for path in paths:
        if "memory" in _protocols(path):
            raise ValueError(
                f"{path}: a memory:// filesystem lives inside one process, and this command's workers are other "
                "processes (they would not see its files, and what they write there would be lost); use a local "
                "path or an object store"
            )


def _protocols(path: str) -> tuple[str, ...]:
    protocol = url_to_fs(path)[0].protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _check_cluster_options(args: argparse.Namespace) -> None:
    """Options for a cluster this run starts are refused with --scheduler, where they would do nothing."""
    if not getattr(args, "scheduler", None):
        return
    names = ["workers", "torch_threads", "dashboard", "slurm_adapt", *SLURM_OPTIONS]
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} set up a cluster that this run starts; with --scheduler the workers "
                         "are that scheduler's: leave them out (or drop --scheduler)")


def _check_precision(args: argparse.Namespace) -> None:
    """fp16 on a local cluster of a machine without a GPU: refused before the cluster starts and loads models."""
    opt = lambda name: getattr(args, name, None)  # noqa: E731
    if args.precision != "fp16" or opt("scheduler") or opt("cluster_config"):
        return  # the workers are elsewhere, or a config file may name another kind of cluster
    from dask_imgcurator import config

    if config.get("cluster.kind", opt("cluster")) in (None, "auto", "local"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--precision fp16 needs a GPU, and this machine has none; use bf16 or fp32 on the CPU")


def _check_output(ddf, args: argparse.Namespace) -> None:
    check_curated_output(ddf, args.out, samples_per_shard=args.samples_per_shard, rekey=args.rekey,
                         overwrite=args.overwrite)


def _input_shards(specs: list[str], out: str) -> list[str]:
    """The shards ``specs`` name, less those in the shard folder of the run's own output ``out``.

    A directory or glob of inputs with ``--out`` inside it would otherwise take the first run's
    output shards as inputs of the next, so that the run could never be resumed or repeated.
    """
    urls = expand_shards(specs)  # local paths absolute, others with their protocol
    own = set(files_inside(urls, posixpath.join(out, "shards")))
    kept = [url for url in urls if url not in own]
    if len(kept) < len(urls):
        print(f"note: leaving out {len(urls) - len(kept)} shard(s) under {out}/shards: this run's own output",
              file=sys.stderr)
    if not kept:
        raise FileNotFoundError(f"no input shards outside {out}/shards")
    return kept


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
    if args.out:
        by_name: dict[str, list[str]] = {}
        for url in urls:
            by_name.setdefault(_index_name(url), []).append(url)
        clashes = {name: same for name, same in by_name.items() if len(same) > 1}
        if clashes:
            name, same = next(iter(clashes.items()))
            raise ValueError(
                f"{len(clashes)} index name(s) in --out {args.out} would be shared by shards of the same "
                f"name, e.g. {name} by {', '.join(same[:3])}; index them without --out (next to each shard) "
                "or into one --out per folder"
            )
    write = dask.delayed(_write_input_index, pure=True)
    with _maybe_client(args.scheduler, [*args.shards, *([args.out] if args.out else [])]):
        results = run_tasks([write(u, args.out) for u in urls], "index", progress=True)
    for url, problem in zip(urls, results):
        if problem:
            print(f"skipped {url}: {problem}", file=sys.stderr)
    written = sum(1 for r in results if r is None)
    print(f"wrote {written} index files for {len(urls)} shards")
    return 0 if written == len(urls) else 1


def _index_name(url: str) -> str:
    """The file name of a shard's DALI index: ``00000.tar`` -> ``00000.idx``."""
    name = posixpath.basename(url)
    return (name[: -len(".tar")] if name.endswith(".tar") else name) + ".idx"


def _write_input_index(url: str, out_dir: str | None) -> str | None:
    """Write ``<shard>.idx``; returns why it could not, or None."""
    members, refused, error = scan_members(url)
    if error:
        return error
    samples = group_samples(members, refused)
    fs, path = url_to_fs(url)
    target = path[: -len(".tar")] + ".idx" if path.endswith(".tar") else path + ".idx"
    if out_dir:
        fs, root = url_to_fs(out_dir)
        fs.makedirs(root, exist_ok=True)
        target = posixpath.join(root, _index_name(url))
    index = io.StringIO()
    write_dali_index([s.members for s in samples], index)
    try:
        write_atomic(fs, target, index.getvalue().encode())
    except Exception as exc:  # OSError, and what read-only filesystems (HTTP) raise instead
        why = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return f"cannot write {full_url(fs, target)} ({why}); give --out DIR to write the index elsewhere"
    return None


if __name__ == "__main__":
    sys.exit(main())
