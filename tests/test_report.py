"""The HTML run report: contents, escaping, edge cases, and rendering in a real headless browser."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dask_imgcurator as ic
from dask_imgcurator.report import read_thumbnails, score_columns, threshold_sweep, thumbnail_figure, write_report
from tests.conftest import jpeg_bytes, write_tar

DEMO_FILTER = "aesthetic_score >= 5.078 and nsfw_score < 0.5102"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def _curate(src: str, out: Path, model, filter_text: str | None) -> dict:
    ddf = ic.read_webdataset(src)
    if model is not None:
        ddf = ic.embed(ddf, model, decoder="pillow")
    if filter_text:
        filt = ic.parse_filter(filter_text)
        ddf = ic.mark_kept(ddf, filt.mask(ddf), ic.drop_reason(ddf, filt))
    else:
        ddf = ic.mark_kept(ddf)
    ic.write_curated(ddf, str(out), samples_per_shard=5)
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return ic.make_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_model):
    """A scored, filtered run over 2 demo shards (16 photos + 2 broken samples)."""
    root = tmp_path_factory.mktemp("report")
    ic.make_demo_shards(str(root / "in"), n_shards=2, samples_per_shard=8, broken=True)
    summary = _curate(str(root / "in"), root / "out", tiny_model, DEMO_FILTER)
    meta = ic.read_parquet(str(root / "out" / "metadata")).compute()
    return root / "out", summary, meta


class _Doc(HTMLParser):
    """Collects what the tests look at: tags, images, table rows, data attributes, text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.stack: list[tuple[str, dict]] = []
        self.sections: dict[str, list[tuple[str, dict]]] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        for t, a in self.stack:
            if t == "section":
                self.sections.setdefault(a.get("id", ""), []).append((tag, attrs))
        if tag not in ("img", "br", "meta"):
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        self.text.append(data)

    def images(self, section: str | None = None) -> list[dict]:
        tags = self.tags if section is None else self.sections.get(section, [])
        return [a for t, a in tags if t == "img"]


def _decode_data_url(src: str) -> Image.Image:
    assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), src[:40]
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    img.load()
    return img


# ----------------------------------------------------------------------------- contents


def test_report_holds_summary_figures_thumbnails_and_failures(demo_run):
    out, summary, meta = demo_run
    path = write_report(str(out), thumbnails=4)
    assert path == str(out / "report.html") and Path(path).is_file()
    text = Path(path).read_text()
    doc = _Doc(text)

    counts = {a["data-count"]: a for t, a in doc.tags if t == "tr" and "data-count" in a}
    assert set(counts) >= {"samples_in", "kept", "filtered", "failed", "written", "balanced"}
    body = " ".join(doc.text)
    n_failed = sum(summary["failed"].values())
    assert summary["samples_in"] == 18 and n_failed == 2
    assert f"samples in {summary['samples_in']}" in " ".join(body.split())
    for cond, n in summary["filtered"].items():
        assert any(t == "tr" and a.get("data-filter") == cond for t, a in doc.tags)
    for kind in summary["failed"]:
        assert any(t == "tr" and a.get("data-failure") == kind for t, a in doc.tags)

    # Every picture is embedded and decodes; the figures are real PNGs of some size.
    for img in doc.images():
        assert _decode_data_url(img["src"]).size[0] > 0
    histogram = _decode_data_url(doc.images("histograms")[0]["src"])
    sweep = _decode_data_url(doc.images("sweep")[0]["src"])
    assert histogram.format == sweep.format == "PNG" and histogram.size[0] > 400 and sweep.size[1] > 200
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()

    # Thumbnails: the best kept samples first, and filtered ones with their reasons.
    kept = meta[meta["kept"]].sort_values("aesthetic_score", ascending=False)
    kept_alts = [a["alt"] for a in doc.images("kept")]
    assert kept_alts == kept["key"].head(4).tolist()
    filtered = meta[~meta["kept"] & meta["error"].isna()]
    dropped_alts = [a["alt"] for a in doc.images("dropped")]
    assert len(dropped_alts) == 4 and set(dropped_alts) <= set(filtered["key"])
    reasons = set(filtered.set_index("key").loc[dropped_alts, "drop_reason"])
    assert reasons == set(filtered["drop_reason"])  # each filter condition is represented

    # Sweep tables for both known scores, with the filter's thresholds marked.
    sweep_tables = [a["data-column"] for t, a in doc.tags if t == "table" and "sweep" in a.get("class", "")]
    assert sweep_tables == ["aesthetic_score", "nsfw_score"]
    assert body.count("(filter)") == 2

    # Failures: one row per failed sample, with its error text.
    failed = meta[meta["error"].notna()]
    for key, error in zip(failed["key"], failed["error"]):
        assert key in body and error in body


def test_report_path_option_and_no_thumbnails(demo_run, tmp_path):
    out, _, _ = demo_run
    target = tmp_path / "sub" / "page.html"
    assert write_report(str(out), str(target), thumbnails=0) == str(target)
    doc = _Doc(target.read_text())
    assert doc.images("kept") == [] and doc.images("dropped") == []
    assert len(doc.images()) == 2  # histograms + sweep
    assert "Thumbnails are turned off." in " ".join(doc.text)
    assert not list(target.parent.glob(".*.tmp"))


def test_report_path_naming_a_directory_writes_report_html_inside(demo_run, tmp_path):
    """--out EXISTING_DIR wrote the page to a hidden temporary file in it, then renamed that to... the dir."""
    out, _, _ = demo_run
    existing = tmp_path / "reports"
    existing.mkdir()
    assert write_report(str(out), str(existing), thumbnails=0) == str(existing / "report.html")
    assert write_report(str(out), f"{tmp_path / 'new'}/", thumbnails=0) == str(tmp_path / "new" / "report.html")
    for folder in (existing, tmp_path / "new"):
        assert [p.name for p in folder.iterdir()] == ["report.html"]
        assert "<html" in (folder / "report.html").read_text()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_report(str(tmp_path))
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="metadata"):
        write_report(str(tmp_path))


def test_report_with_nothing_kept_and_nothing_failed(tmp_path, tiny_model):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=5)
    summary = _curate(str(tmp_path / "in"), tmp_path / "out", tiny_model, "aesthetic_score > 100")
    assert summary["kept"] == 0 and summary["failed"] == {} and summary["samples_in"] == 5
    doc = _Doc(Path(write_report(str(tmp_path / "out"))).read_text())
    body = " ".join(doc.text)
    assert "No sample was kept." in body and "No sample failed." in body
    assert doc.images("kept") == [] and len(doc.images("dropped")) == 5
    assert not any(t == "table" and a.get("id") == "failures-table" for t, a in doc.tags)


def test_report_escapes_untrusted_text_and_handles_runs_without_scores(tmp_path):
    evil_key = "k<svg/onload=alert(1)>"  # no white space: DALI index lines cannot hold it
    evil_caption = '<script>alert("caption")</script> & "quotes"'
    write_tar(tmp_path / "evil.tar", [
        ("ok0.jpg", jpeg_bytes(1)), ("ok0.txt", evil_caption.encode()),
        (f"{evil_key}.jpg", jpeg_bytes(2)), (f"{evil_key}.txt", b"fine"),
        ("noimage<b>.txt", b"<iframe src=javascript:alert(2)>"),
    ])
    summary = _curate(str(tmp_path / "evil.tar"), tmp_path / "out", None, None)
    assert summary["kept"] == 2 and sum(summary["failed"].values()) == 1
    text = Path(write_report(str(tmp_path / "out"))).read_text()
    doc = _Doc(text)
    assert [t for t, _ in doc.tags if t in ("script", "iframe")] == []
    assert all(a["src"].startswith("data:image/") for a in doc.images())
    assert "&lt;script&gt;alert(&quot;caption&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    assert "k&lt;svg/onload=alert(1)&gt;" in text and "noimage&lt;b&gt;" in text
    assert sorted(a["alt"] for a in doc.images("kept")) == sorted(["ok0", evil_key])  # alt is unescaped by the parser
    body = " ".join(doc.text)
    assert "no score columns" in body and "sweep" not in doc.sections


@pytest.mark.parametrize("samples, written", [(1, "1 sample in 1 shard"), (6, "6 samples in 2 shards")])
def test_report_counts_written_samples_and_shards_in_words(tmp_path, samples, written):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=samples)
    _curate(str(tmp_path / "in"), tmp_path / "out", None, None)  # 5 samples per output shard
    text = Path(write_report(str(tmp_path / "out"), thumbnails=0)).read_text()
    row = re.search(r'<tr data-count="written"><th>written</th><td class="num">([^<]*)</td>', text)
    assert row is not None and row.group(1) == written


def _nudged(value: np.float32, direction: float) -> float:
    """A float64 a quarter of a float32 step from ``value``: it rounds back to ``value`` in float32."""
    return float(value) + direction * float(np.spacing(value)) / 4


def test_threshold_sweep_compares_like_the_filter():
    scores = pd.Series(np.array([5.0796008, 5.0796008, 4.0, 6.0, np.nan], dtype=np.float32), name="s")
    v = scores.iloc[0]
    for keep, t in [(">=", _nudged(v, +1)), (">", _nudged(v, -1)), ("<=", _nudged(v, -1)), ("<", _nudged(v, +1))]:
        filtered = int(ic.parse_filter(f"s {keep} {t!r}").mask(scores.to_frame()).sum())
        assert threshold_sweep(scores, [t], keep=keep)["surviving"].tolist() == [filtered], keep
    # float32 compares v >= t as equal; float64 would drop both copies of v
    assert threshold_sweep(scores, [_nudged(v, +1)], keep=">=")["surviving"].tolist() == [3]
    # float64 scores are compared in float64, as the filter does
    wide = scores.astype("float64")
    assert threshold_sweep(wide, [_nudged(v, +1)], keep=">=")["surviving"].tolist() == [1]
    assert int(ic.parse_filter(f"s >= {_nudged(v, +1)!r}").mask(wide.to_frame()).sum()) == 1


def test_report_sweep_agrees_with_the_filter_at_its_threshold(tmp_path, tiny_model):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=6)
    scores = ic.embed(ic.read_webdataset(str(tmp_path / "in")), tiny_model, decoder="pillow").compute()
    assert scores["aesthetic_score"].dtype == np.float32
    # on a score: compared in float32 the sample with it passes, in float64 it would not
    threshold = _nudged(np.sort(scores["aesthetic_score"].to_numpy())[2], +1)
    summary = _curate(str(tmp_path / "in"), tmp_path / "out", tiny_model, f"aesthetic_score >= {threshold!r}")
    assert 0 < summary["kept"] < 6 and summary["failed"] == {}
    text = Path(write_report(str(tmp_path / "out"), thumbnails=0)).read_text()
    table = re.search(r'<table class="sweep" data-column="aesthetic_score">(.*?)</table>', text, re.S).group(1)
    chosen = re.findall(r'<tr class="chosen"><td class="num">[^<]*</td><td class="num">(\d+)</td>', table)
    assert chosen == [str(summary["kept"])]


def test_a_threshold_is_marked_only_in_the_table_of_its_direction(tmp_path, tiny_model):
    """With ">= low and < high" the ">=" table marks "low" only: at "high" it counts what "<" dropped."""
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=6)
    scores = ic.embed(ic.read_webdataset(str(tmp_path / "in")), tiny_model, decoder="pillow").compute()
    ordered = np.sort(scores["aesthetic_score"].to_numpy())
    low, high = float(ordered[1]), float(ordered[4])
    summary = _curate(str(tmp_path / "in"), tmp_path / "out", tiny_model,
                      f"aesthetic_score >= {low!r} and aesthetic_score < {high!r}")
    assert summary["kept"] == 3
    text = Path(write_report(str(tmp_path / "out"), thumbnails=0)).read_text()
    table = re.search(r'<table class="sweep" data-column="aesthetic_score">(.*?)</table>', text, re.S).group(1)
    assert "aesthetic_score &gt;=" in table
    chosen = re.findall(r'<tr class="chosen"><td class="num">([^<]*) \(filter\)</td>', table)
    assert chosen == [f"{low:.6g}"]


def test_kept_thumbnails_come_from_the_output_when_the_source_is_gone(tmp_path):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=3)
    _curate(str(tmp_path / "in"), tmp_path / "out", None, None)
    shutil.rmtree(tmp_path / "in")
    (tmp_path / "out").rename(tmp_path / "moved")  # the output's own paths are found relative to it
    doc = _Doc(Path(write_report(str(tmp_path / "moved"))).read_text())
    kept = doc.images("kept")
    assert len(kept) == 3 and all(_decode_data_url(a["src"]).size[0] > 0 for a in kept)


def test_kept_thumbnails_from_the_output_match_their_source_shard_when_keys_repeat(tmp_path):
    """Rekeyed samples of two sources with the same keys: each falls back to its own image, not the first
    sample of that key (three of six showed another sample's picture)."""
    for name, seed in (("a", 0), ("b", 7)):
        ic.make_demo_shards(str(tmp_path / name), n_shards=1, samples_per_shard=3, seed=seed)
    ddf = ic.mark_kept(ic.read_webdataset([str(tmp_path / "a" / "demo-00000.tar"), str(tmp_path / "b" / "demo-00000.tar")]))
    ic.write_curated(ddf, str(tmp_path / "out"), samples_per_shard=5, rekey=True)
    before = [a["src"] for a in _Doc(Path(write_report(str(tmp_path / "out"))).read_text()).images("kept")]
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    after = [a["src"] for a in _Doc(Path(write_report(str(tmp_path / "out"))).read_text()).images("kept")]
    assert len(set(before)) == 6 and len(set(after)) == 6


# ----------------------------------------------------------------------------- command line


def _cli_has(*args: str) -> bool:
    from dask_imgcurator.cli import build_parser

    try:
        build_parser().parse_args(list(args))
    except SystemExit:
        return False
    return True


def test_cli_report_command(demo_run, tmp_path, capsys):
    from dask_imgcurator.cli import main

    if not _cli_has("report", "OUT"):
        pytest.skip("`imgcurator report` is not wired into cli.py yet")
    out, summary, _ = demo_run
    target = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(target), "--thumbnails", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {target}"
    assert len(_Doc(target.read_text()).images("kept")) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_curate_writes_the_report_when_asked(tmp_path, tiny_model, capsys):
    from dask_imgcurator.cli import main

    if not _cli_has("curate", "IN", "--out", "OUT", "--report"):
        pytest.skip("`imgcurator curate --report` is not wired into cli.py yet")
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=6, broken=True)
    argv = ["curate", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model",
            f"{tiny_model.name}/{tiny_model.pretrained}", "--model-dir", tiny_model.model_dir, "--offline",
            "--filter", DEMO_FILTER, "--workers", "1", "--decoder", "pillow", "--report"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"report: {tmp_path / 'out' / 'report.html'}" in capsys.readouterr().out
    doc = _Doc((tmp_path / "out" / "report.html").read_text())
    assert len(doc.images("histograms")) == 1
    assert any(t == "table" and a.get("id") == "failures-table" for t, a in doc.tags)


# ----------------------------------------------------------------------------- building blocks


def test_threshold_sweep_counts_survivors_in_both_directions():
    scores = pd.Series([1.0, 2.0, 3.0, 4.0, np.nan])
    up = threshold_sweep(scores, [2, 3, 2], keep=">=")
    assert up["threshold"].tolist() == [2.0, 3.0] and up["surviving"].tolist() == [3, 2]
    assert up["fraction"].tolist() == [0.75, 0.5]
    down = threshold_sweep(scores, [2.5], keep="<")
    assert down["surviving"].tolist() == [2]
    auto = threshold_sweep(scores, keep=">=")
    assert auto["threshold"].is_monotonic_increasing and auto["surviving"].is_monotonic_decreasing
    assert auto["threshold"].min() >= 1.0 and auto["threshold"].max() <= 4.0 and len(auto) >= 3
    assert threshold_sweep([np.nan], keep="<").empty
    assert threshold_sweep([5.0, 5.0])["surviving"].tolist() == [2]
    with pytest.raises(ValueError, match="keep"):
        threshold_sweep(scores, keep="==")


def test_score_columns_puts_known_scores_first():
    columns = ["nsfw_score", "key", "x_score", "aesthetic_score"]
    assert score_columns(columns) == ["aesthetic_score", "nsfw_score", "x_score"]


def test_thumbnails_and_figure_survive_unreadable_rows(demo_run):
    _, _, meta = demo_run
    rows = meta.head(3).copy()
    rows.loc[rows.index[1], "shard"] = "/nonexistent/shard.tar"
    failed = meta[meta["error"].notna()]
    images = read_thumbnails(pd.concat([rows, failed]), size=32)
    assert [img is None for img in images] == [False, True, False, True, True]
    assert all(max(img.size) == 32 and img.mode == "RGB" for img in images if img is not None)
    fig = thumbnail_figure(pd.concat([rows, failed]), title="t", columns=2)
    assert len(fig.axes) == 6
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert Image.open(buf).size[0] > 0
    assert len(thumbnail_figure(rows.iloc[:0]).axes) == 1


# ----------------------------------------------------------------------------- in a real browser

#: Appended to a copy of the page: records what the browser actually laid out and decoded.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
  const result = {
    images: [...document.images].map((i) => ({alt: i.alt, section: i.closest("section").id, complete: i.complete,
                                               natural: [i.naturalWidth, i.naturalHeight], shown: box(i)})),
    tables: [...document.querySelectorAll("table")].map((t) => ({id: t.id, cls: t.className, rows: t.rows.length,
                                                                 shown: box(t)})),
    counts: Object.fromEntries([...document.querySelectorAll("tr[data-count]")].map(
      (r) => [r.dataset.count, r.querySelector("td").innerText])),
    failures: [...document.querySelectorAll("#failures-table tr")].slice(1).map((r) => r.cells[0].innerText),
    height: document.documentElement.scrollHeight,
  };
  const out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no headless browser at {CHROMIUM} (run .ci/install-browser)")
def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    out, summary, meta = demo_run
    page = Path(write_report(str(out), str(tmp_path / "report.html"), thumbnails=6))
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))

    run = _chromium(tmp_path, "--window-size=1280,800", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    marker = '<pre id="probe-result">'
    assert marker in run.stdout, f"the page did not finish loading:\n{run.stderr[-2000:]}"
    raw = run.stdout.split(marker, 1)[1].split("</pre>", 1)[0]
    result = json.loads(raw.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))

    # Figures and thumbnails decoded and laid out with a size.
    sections = [i["section"] for i in result["images"]]
    assert sections.count("histograms") == 1 and sections.count("sweep") == 1
    assert sections.count("kept") == min(6, summary["kept"]) and sections.count("dropped") == 6
    for img in result["images"]:
        assert img["complete"] and min(img["natural"]) > 0 and min(img["shown"]) > 0, img
    # Tables laid out, with the run's counts as the browser shows them.
    tables = {t["id"] or t["cls"]: t for t in result["tables"]}
    assert min(tables["summary-table"]["shown"]) > 0
    assert tables["failures-table"]["rows"] == 1 + sum(summary["failed"].values())
    assert sum(1 for t in result["tables"] if t["cls"] == "sweep" and t["rows"] > 2) == 2
    assert result["counts"]["samples_in"] == str(summary["samples_in"])
    assert result["counts"]["kept"].startswith(f"{summary['kept']} (")
    assert result["counts"]["filtered"].startswith(f"{sum(summary['filtered'].values())} (")
    assert result["counts"]["failed"].startswith(f"{sum(summary['failed'].values())} (")
    assert result["counts"]["balanced"] == "yes"
    assert sorted(result["failures"]) == sorted(meta.loc[meta["error"].notna(), "key"])

    # A screenshot of the whole (unmodified) page, kept for people to look at.
    shot = tmp_path / "report.png"
    height = min(int(result["height"]), 10_000)
    run = _chromium(tmp_path, f"--window-size=1280,{height}", f"--screenshot={shot}", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (height, 1280) and pixels.std() > 20  # not a blank page
    artifacts = os.environ.get("IMGCURATOR_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report-screenshot.png")
        shutil.copy(page, Path(artifacts) / "report.html")
    print(f"screenshot: {shot}")
