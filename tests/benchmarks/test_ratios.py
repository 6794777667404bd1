"""benchmarks/run.py: how curate runs are compared with the ceilings measured around them."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import run  # noqa: E402


def line(finished_at_s: float, seconds: float, images_per_s: float) -> dict:
    return {"finished_at_s": finished_at_s, "seconds": seconds, "images_per_s": images_per_s}


def test_a_run_between_two_ceilings_gets_the_ceiling_interpolated_at_its_middle():
    # ceilings centred at t=10 (10 images/s) and t=110 (12 images/s); runs centred at 35 and 85
    ceilings = [line(20, 20, 10.0), line(120, 20, 12.0)]
    runs = [line(45, 20, 9.0), line(95, 20, 9.0)]
    assert run._bracketed(ceilings, runs) == pytest.approx([10.5, 11.5])


def test_each_run_uses_the_ceilings_nearest_to_it_on_either_side():
    ceilings = [line(10, 10, 8.0), line(60, 10, 10.0), line(110, 10, 14.0)]  # middles 5, 55, 105
    runs = [line(40, 20, 1.0), line(90, 20, 1.0)]  # middles 30 and 80
    assert run._bracketed(ceilings, runs) == pytest.approx([9.0, 12.0])


def test_a_run_with_ceilings_on_one_side_only_takes_the_nearest():
    ceilings = [line(10, 10, 8.0), line(30, 10, 10.0)]
    assert run._bracketed(ceilings, [line(100, 10, 1.0)]) == [10.0]
    assert run._bracketed(ceilings, [line(3, 2, 1.0)]) == [8.0]


def test_the_curate_ratio_is_taken_against_the_interpolated_ceiling(capsys, monkeypatch):
    monkeypatch.setattr(run, "_VERDICTS", [])
    results = {
        ("curate", "m", "fp32"): [line(50, 20, 9.0)],
        ("ceiling", "m", "fp32", "threads"): [line(20, 20, 9.0), line(80, 20, 11.0)],  # 10.0 at t=40
        ("ceiling", "m", "fp32", "procs"): [line(20, 20, 8.0), line(80, 20, 8.0)],
        ("ceiling", "m", "fp32", "threads_other_kernels"): [],
    }
    run._emit_ratios(results, "m", "fp32", threads=2)
    out = [run.json.loads(x) for x in capsys.readouterr().out.splitlines()]
    (ratio,) = [x for x in out if x.get("ratio") == "curate/model_ceiling"]
    assert ratio["ceiling_layout"] == "threads"
    assert ratio["value"] == pytest.approx(0.9)
    assert ratio["against_ceiling_before"] == pytest.approx(1.0)  # the old pairing: the ceiling before only
    assert ratio["met"] is True


def test_batch_sizes_span_a_quarter_to_four_times_the_default():
    assert run.batch_sizes(32) == [8, 16, 32, 64, 128]
    assert run.batch_sizes(256) == [64, 128, 256, 512, 1024]
    assert run.batch_sizes(2) == [1, 2, 4, 8]  # a quarter and a half of 2 round to the same size, 1


def test_the_batch_verdict_names_the_fastest_size_and_the_default_against_it():
    def batch_line(size: int, rate: float) -> dict:
        return {"section": "batch", "model": "m", "precision": "bf16", "device": "cuda", "batch_size": size,
                "default_batch_size": 256, "images_per_s": rate}

    lines = [batch_line(128, 1800.0), batch_line(256, 2000.0), batch_line(512, 2500.0)]
    verdict = run.batch_verdict(lines)
    assert verdict["best_batch_size"] == 512
    assert verdict["default_batch_size"] == 256
    assert verdict["value"] == pytest.approx(0.8)
    assert verdict["images_per_s"] == {128: 1800.0, 256: 2000.0, 512: 2500.0}
