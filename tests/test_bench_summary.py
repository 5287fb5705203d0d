"""bench/summarize.py's target verdicts (what a GPU session reads its results from)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("summarize", Path(__file__).parents[1] / "bench" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def _bench(test, problem, impl, mode, ms, peak=None):
    return {"name": f"{test}[{impl}-{mode}]", "params": {"problem": problem, "impl": impl, "mode": mode},
            "stats": {"mean": ms / 1e3}, "extra_info": {"peak_memory_bytes": peak}}


def test_targets_met_and_missed():
    mfn, pv = "test_bench_mfn_stack", "test_bench_project_volume"
    p3 = [3, 128, 3, [64, 64, 64]]
    rows = [
        _bench(mfn, p3, "triton", "forward", 1.0), _bench(mfn, p3, "eager", "forward", 5.0),
        _bench(mfn, p3, "triton", "forward_backward", 4.0, peak=100), _bench(mfn, p3, "eager", "forward_backward", 4.4, 1000),
        _bench(mfn, p3, "compile", "forward_backward", 3.1),
        _bench(pv, [128, 600], "triton", "forward", 11.0, peak=57e6), _bench(pv, [128, 600], "reference", "forward", 111.0),
        _bench(pv, [64, 600], "triton", "forward", 0.4),
    ]
    lines = summarize.targets(rows)
    text = "\n".join(lines)
    assert "forward, vs eager: 5x (target >= 4x) met" in text
    assert "forward_backward, vs eager: 1.1x (target >= 3x) NOT met" in text
    assert "forward_backward, vs torch.compile: 0.775x (target >= 1.5x) NOT met" in text
    assert "peak memory vs eager: 0.1x (target <= 0.5x) met" in text
    assert "D=128 B=600 forward, vs chunked reference: 10.1x (target >= 10x) met" in text
    assert "D=128 B=600 forward, time: 11 ms (target <= 3 ms) NOT met" in text
    assert "D=128 B=600 forward, extra memory: 57 MB (target <= 64 MB) met" in text
    assert "D=64 B=600 forward, vs chunked reference: not measured" in text
    assert "D=64 B=600 forward, time: 0.4 ms (target <= 0.5 ms) met" in text
    assert summarize.targets([r for r in rows if r["params"]["impl"] != "triton"]) == []


def test_paper_epoch_targets_and_table():
    def run(case, seconds, minutes=None):
        return {"name": f"test_bench_paper_epoch[{case}]", "stats": {"mean": seconds},
                "extra_info": {"case": case, "particles": 50000, "projected_minutes": minutes}}

    rows = [run("trainer", 3.0, 5.0), run("host_round_trips", 9.0, 15.0)]
    text = "\n".join(summarize.paper_epoch_targets(rows))
    assert "seconds per epoch: 3 s (target <= 4 s) met" in text
    assert "whole preset: 5 min (target <= 7 min) met" in text
    assert "host round trips: 3x" in text
    slow = "\n".join(summarize.paper_epoch_targets([run("trainer", 6.0, 10.0)]))
    assert "6 s (target <= 4 s) NOT met" in slow and "10 min (target <= 7 min) NOT met" in slow
    table = "\n".join(summarize.paper_epoch_table(rows))
    assert "| trainer | 50000 | - | 3.00 s | 5.0 min |" in table
