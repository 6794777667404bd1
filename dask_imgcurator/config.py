"""Settings of ``dask_imgcurator`` in dask's configuration, under the ``imgcurator`` namespace.

Defaults live in ``imgcurator.yaml`` beside this module and are registered with
:func:`dask.config.update_defaults` when this module is imported, so everything dask reads
overrides them: dask config files (``~/.config/dask/*.yaml``), environment variables and
:func:`dask.config.set`. Keyword arguments of the functions that read them win over all::

    DASK_IMGCURATOR__SLURM__QUEUE=gpu                  # imgcurator.slurm.queue = "gpu"
    DASK_IMGCURATOR__SLURM__GPUS=2                     # values are parsed as Python literals
    DASK_IMGCURATOR__SLURM__JOB_SCRIPT_PROLOGUE='["module load cuda"]'
    DASK_IMGCURATOR__CLUSTER__KIND=slurm

Environment variables are read when dask is imported; after changing ``os.environ`` in a
running process call :func:`dask.config.refresh`.

>>> from dask_imgcurator import config
>>> config.get("slurm.walltime")
'01:00:00'
>>> config.get("slurm.walltime", "04:00:00")          # an explicit value wins
'04:00:00'
>>> config.section("slurm", cores=4)["cores"]
4
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import dask.config
import yaml

__all__ = ["NAMESPACE", "DEFAULTS_FILE", "get", "section", "read_config_file", "use_config_file", "ensure_config_file"]

NAMESPACE = "imgcurator"
DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "imgcurator.yaml")

with open(DEFAULTS_FILE) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def get(key: str, value: Any = None) -> Any:
    """``value`` when it is not None, else ``imgcurator.<key>`` from dask's config.

    Parameters
    ----------
    key : str
        Dotted key below ``imgcurator``, e.g. ``"slurm.queue"`` (``-`` and ``_`` are equivalent).
    value : object, optional
        An explicit value (a keyword argument or CLI option): returned as is unless None.
    """
    if value is not None:
        return value
    return dask.config.get(f"{NAMESPACE}.{key}")


def section(name: str, **overrides: Any) -> dict[str, Any]:
    """The settings of ``imgcurator.<name>`` as a dict with Python names (``n_workers``).

    Keyword arguments that are not None replace the configured values; names the section does
    not have raise ``TypeError`` (a typo should not pass silently).
    """
    configured = dask.config.get(f"{NAMESPACE}.{name}") or {}
    result = {_python_name(k): v for k, v in configured.items()}
    known = {_python_name(k) for k in DEFAULTS[NAMESPACE].get(name, {})} | set(result)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {NAMESPACE}.{name} setting(s) {unknown}; known: {sorted(known)}")
    result.update({k: v for k, v in overrides.items() if v is not None})
    return result


def _python_name(key: str) -> str:
    return key.replace("-", "_")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file of ``imgcurator:`` settings (same layout as ``imgcurator.yaml``).

    Unknown sections or keys raise ``ValueError`` naming them (free-form values such as
    ``scheduler-options`` may hold anything). Other top-level namespaces (``distributed:``,
    ``jobqueue:``) are returned as they are.
    """
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict) or NAMESPACE not in loaded:
        raise ValueError(f"{path}: expected a mapping with a top-level '{NAMESPACE}:' key (see {DEFAULTS_FILE})")
    ours = loaded[NAMESPACE] or {}
    if not isinstance(ours, dict):
        raise ValueError(f"{path}: '{NAMESPACE}:' must hold sections such as 'slurm:' or 'local:'")
    defaults = DEFAULTS[NAMESPACE]
    for name, values in ours.items():
        canonical = _python_name(name).replace("_", "-")
        if canonical not in defaults:
            raise ValueError(f"{path}: unknown section '{NAMESPACE}.{name}'; known: {sorted(defaults)}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: '{NAMESPACE}.{name}' must be a mapping of settings")
        known = {k.replace("_", "-") for k in defaults[canonical]}
        unknown = sorted(k for k in values if k.replace("_", "-") not in known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown} in '{NAMESPACE}.{name}'; known: {sorted(known)}")
    return loaded


@contextlib.contextmanager
def use_config_file(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Apply a config file (see :func:`read_config_file`) for the duration of a ``with`` block.

    Its values override config files and environment variables; settings it does not name keep
    their values.
    """
    loaded = read_config_file(path)
    with dask.config.set(dict(flatten(loaded))):
        yield loaded


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested mapping, as ``dask.config.set`` takes them."""
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def ensure_config_file(directory: str | None = None) -> str:
    """Copy the defaults, commented out, to ``DIRECTORY/imgcurator.yaml`` unless that file exists.

    ``directory`` defaults to dask's config directory (``~/.config/dask`` or ``$DASK_CONFIG``),
    where dask reads it from. Returns the path of the file to edit. Not called on import:
    nothing is written behind the user's back.
    """
    directory = directory or dask.config.PATH
    dask.config.ensure_file(source=DEFAULTS_FILE, destination=directory, comment=True)
    return os.path.join(directory, os.path.basename(DEFAULTS_FILE))
