"""Print pytest-benchmark JSON files as one table (mean time, throughput, peak memory, what
the timed choices picked), then each issue target with the ratio it needs and whether the
run meets it.

    python bench/summarize.py dir/*.json
"""

from __future__ import annotations

import json
import sys

MiB = 2**20


def table(data: dict) -> list[str]:
    lines = [f"## {data.get('machine_info', {}).get('node', '')}"]
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        rate = info.get("points_per_s") or info.get("projections_per_s")
        mem = info.get("peak_memory_bytes")
        lines.append(f"{b['name']:<70} {b['stats']['mean'] * 1e3:9.3f} ms  "
                     f"{rate or 0:10.4g}/s  {(mem or 0) / MiB:9.1f} MiB  {info.get('precision', '')}")
        # what the first calls chose by timing (mfn_stack strategies, projector gradient)
        for k in ("strategies", "volume_gradient_method"):
            if info.get(k):
                lines.append(f"    {k}: {info[k]}")
    return lines


def _runs(benchmarks: list[dict], test: str) -> dict:
    """{(problem, mode): {impl: (mean seconds, peak bytes or None)}} for one bench test."""
    out: dict = {}
    for b in benchmarks:
        p = b.get("params") or {}
        if not b.get("name", "").startswith(test) or "impl" not in p:
            continue
        key = (json.dumps(p.get("problem")), p.get("mode"))
        out.setdefault(key, {})[p["impl"]] = (b["stats"]["mean"], b.get("extra_info", {}).get("peak_memory_bytes"))
    return out


def _verdict(what: str, value: float | None, goal: float, at_least: bool, unit: str = "x") -> str:
    if value is None:
        return f"{what}: not measured"
    ok = value >= goal if at_least else value <= goal
    return f"{what}: {value:.3g}{unit} (target {'>=' if at_least else '<='} {goal:g}{unit}) {'met' if ok else 'NOT met'}"


def targets(benchmarks: list[dict]) -> list[str]:
    """Issue 4 (mfn_stack) and issue 8 (project_volume) targets, for the float32 Triton rows."""
    lines = []
    for (problem, mode), r in sorted(_runs(benchmarks, "test_bench_mfn_stack").items()):
        if "triton" not in r:
            continue
        t, mem = r["triton"]
        eager, comp = r.get("eager"), r.get("compile")
        head = f"mfn_stack {problem} {mode}"
        if mode == "forward":
            lines.append(_verdict(f"{head}, vs eager", eager and eager[0] / t, 4.0, True))
        else:
            lines.append(_verdict(f"{head}, vs eager", eager and eager[0] / t, 3.0, True))
            lines.append(_verdict(f"{head}, vs torch.compile", comp and comp[0] / t, 1.5, True))
            ratio = mem / eager[1] if eager and mem and eager[1] else None
            lines.append(_verdict(f"{head}, peak memory vs eager", ratio, 0.5, False))
    for (problem, mode), r in sorted(_runs(benchmarks, "test_bench_project_volume").items()):
        if "triton" not in r:
            continue
        D, B = json.loads(problem)
        t, mem = r["triton"]
        head = f"project_volume D={D} B={B} {mode}"
        ref = r.get("reference")
        lines.append(_verdict(f"{head}, vs chunked reference", ref and ref[0] / t, 10.0, True))
        if mode == "forward" and B == 600 and D in (64, 128):
            lines.append(_verdict(f"{head}, time", t * 1e3, 0.5 if D == 64 else 3.0, False, " ms"))
            if D == 128:
                lines.append(_verdict(f"{head}, extra memory", mem and mem / 1e6, 64.0, False, " MB"))
    return lines


def main(paths: list[str]) -> None:
    benchmarks = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"{path}: unreadable ({exc})")
            continue
        print(f"# {path}")
        print("\n".join(table(data)))
        benchmarks += data["benchmarks"]
    lines = targets(benchmarks)
    print("\n## targets (float32 Triton)\n" + ("\n".join(lines) if lines else "no Triton rows"))


if __name__ == "__main__":
    main(sys.argv[1:])
