"""The quickstart notebook stays clean in git and runs top to bottom on CPU with the tiny model."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"
#: Things that must not be committed: absolute paths of somebody's machine, live dashboard addresses.
MACHINE_PATHS = re.compile(r"(/(home|Users|tmp|work|root|private|var|mnt)/|[A-Za-z]:\\\\|127\.0\.0\.1|localhost:\d)")


def test_committed_notebook_has_no_outputs_or_machine_paths():
    text = NOTEBOOK.read_text()
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}
    for cell in nb.cells:
        assert cell.metadata in ({}, {"tags": cell.metadata.get("tags")}), cell.source[:60]
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert not MACHINE_PATHS.search(text), MACHINE_PATHS.search(text).group(0)
    source = "\n".join(c.source for c in nb.cells)
    for needed in ("local_cluster()", "dashboard_link", "make_demo_shards", "make_tiny_model_dir", "ViT-L-14/openai",
                   "threshold_sweep", "write_curated", "write_report", "wds.WebDataset"):
        assert needed in source, needed


def _kernel_manager(tmp_path: Path):
    """A kernel that runs on this interpreter (the test's venv), whatever kernels the user has installed."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "python3")
    spec = json.loads((kernels / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


@pytest.mark.slow
def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    work = tmp_path / "run"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=240, resources={"metadata": {"path": str(work)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look when it fails

    streams, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.ename}: {out.evalue}"
            if out.output_type == "stream" and out.name == "stdout":
                streams.append(out.text)
            pngs += "image/png" in out.get("data", {})
    text = "".join(streams)
    assert re.search(r"dashboard: http://\S+/status", text), text[:500]
    summary = json.loads((work / "imgcurator-notebook" / "curated" / "summary.json").read_text())
    assert summary["balanced"] and summary["failed"] and summary["kept"] > 0
    assert f"samples in: {summary['samples_in']} = kept {summary['kept']}" in text
    assert f"read {summary['kept']} samples from {summary['shards']} shards" in text
    assert pngs >= 6  # histograms, sweep, four thumbnail grids
    assert (work / "imgcurator-notebook" / "curated" / "report.html").is_file()
    assert list((work / "imgcurator-notebook" / "curated" / "shards").glob("*.tar"))
