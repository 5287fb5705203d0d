"""Markdown tables from pytest-benchmark JSON files: one table per benchmark file
(``mfn_stack``, ``project_volume``, ``epoch``; a benchmark's ``group``, where set, names its
table instead), each with what the JSON records of the run (date, device, versions, commit),
then each issue target with the ratio it needs and whether the run meets it.

    python bench/summarize.py dir/*.json > table.md

A run's output replaces the tables in bench/RESULTS.md. The JSON files are what ``pytest
bench/ --benchmark-only --benchmark-json=FILE`` writes (``bench/run_gpu.sh`` writes one per
step); several files of one run merge into the same tables.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import PurePosixPath

MiB = 2**20

# column order and labels per table (implementations not listed go last, by name)
MFN_IMPLS = {"triton": "Triton fp32", "triton_mixed": "Triton mixed", "triton_graph": "Triton fp32, CUDA graph",
             "eager": "eager", "compile": "compile"}
MFN_SHORT = {"triton": "fp32", "triton_mixed": "mixed", "triton_graph": "graph"}
PV_IMPLS = {"triton": "Triton", "triton_deterministic": "Triton deterministic",
            "reference": "reference (chunked grid_sample)", "paper": "paper (expanded volume)",
            "fourier": "Fourier-slice", "compile": "compile(reference)"}
PASSES = {"forward": "forward", "forward_backward": "fwd+bwd"}


def group_name(b: dict) -> str:
    """The table a benchmark belongs to: its ``group``, else its file's name without
    ``test_bench_`` (``bench/test_bench_epoch.py::...`` -> ``epoch``), else its test's."""
    if b.get("group"):
        return str(b["group"])
    full = b.get("fullname", "")
    stem = PurePosixPath(full.split("::")[0]).stem if "::" in full else b.get("name", "").split("[")[0]
    return stem.removeprefix("test_bench_")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.0f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None or den <= 0 else f"{num / den:.2f}x"


def _ordered(present, order: dict) -> list[str]:
    return [k for k in order if k in present] + sorted(k for k in present if k not in order)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _points(shape) -> str:
    if len(shape) == 3 and len(set(shape)) == 1:
        return f"{shape[0]}^3"
    n = math.prod(shape)
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def _mean(b: dict) -> float:
    return b["stats"]["mean"]


def _notes(rows: list[dict], keys: tuple[str, ...]) -> list[str]:
    """What the first calls chose, as the benchmarks recorded it in ``extra_info`` (each
    distinct record once: the benchmarks record what was chosen so far in the process)."""
    seen = []
    for b in rows:
        info = b.get("extra_info", {})
        for k in keys:
            if info.get(k):
                line = f"- {k}: `{json.dumps(info[k], sort_keys=True)}`"
                if line not in seen:
                    seen.append(line)
    return [""] + seen if seen else []


def mfn_table(benchmarks: list[dict]) -> list[str]:
    """``test_bench_mfn_stack``: one row per problem, size and pass; a column per
    implementation; speed-ups (the other's time over ours) against eager and compile; peak
    extra memory (MiB)."""
    cells: dict = {}
    for b in benchmarks:
        p = b.get("params") or {}
        if "impl" not in p or "problem" not in p:
            continue
        d, h, s, shape = p["problem"]
        key = (d, h, s, math.prod(shape), json.dumps(shape), p.get("mode"))
        cells.setdefault(key, {})[p["impl"]] = b
    impls = _ordered({i for r in cells.values() for i in r}, MFN_IMPLS)
    fast = [i for i in impls if i in MFN_SHORT]
    mem = [i for i in impls if any(r.get(i, {}).get("extra_info", {}).get("peak_memory_bytes") is not None
                                   for r in cells.values())]
    header = ["problem", "points", "pass"] + [MFN_IMPLS.get(i, i) for i in impls]
    for base in ("eager", "compile"):
        if base in impls and fast:
            header.append(" / ".join(MFN_SHORT[i] for i in fast) + f" vs {base}")
    if mem:
        header.append("peak MiB " + " / ".join(MFN_SHORT.get(i, i) for i in mem))
    rows, noted = [], []
    for key in sorted(cells):
        d, h, s, _, shape, mode = key
        r = cells[key]
        t = {i: _mean(r[i]) if i in r else None for i in impls}
        label = f"{d}D h{h} s{s}"
        row = [label, _points(json.loads(shape)), PASSES.get(mode, mode)] + [_ms(t[i]) for i in impls]
        for base in ("eager", "compile"):
            if base in impls and fast:
                row.append(" / ".join(_ratio(t[base], t[i]) for i in fast))
        if mem:
            row.append(" / ".join(_mib(r[i].get("extra_info", {}).get("peak_memory_bytes")) if i in r else "-"
                                  for i in mem))
        rows.append(row)
        noted += [r[i] for i in fast if i in r]
    return _table(header, rows) + _notes(noted, ("strategies", "configs"))


def project_table(benchmarks: list[dict]) -> list[str]:
    """``test_bench_project_volume``: one row per D, B and pass; a column per
    implementation; Triton's speed-up over the chunked reference; peak extra memory (MiB)."""
    cells: dict = {}
    for b in benchmarks:
        p = b.get("params") or {}
        if "impl" not in p or "problem" not in p:
            continue
        D, B = p["problem"]
        cells.setdefault((D, B, p.get("mode")), {})[p["impl"]] = b
    impls = _ordered({i for r in cells.values() for i in r}, PV_IMPLS)
    mem = [i for i in impls if any(r.get(i, {}).get("extra_info", {}).get("peak_memory_bytes") is not None
                                   for r in cells.values())]
    header = ["D", "B", "pass"] + [PV_IMPLS.get(i, i) for i in impls]
    if "triton" in impls and "reference" in impls:
        header.append("Triton vs reference")
    if mem:
        header.append("extra MiB " + " / ".join(mem))
    rows, noted = [], []
    for key in sorted(cells):
        D, B, mode = key
        r = cells[key]
        t = {i: _mean(r[i]) if i in r else None for i in impls}
        row = [str(D), str(B), PASSES.get(mode, mode)] + [_ms(t[i]) for i in impls]
        if "triton" in impls and "reference" in impls:
            row.append(_ratio(t["reference"], t["triton"]))
        if mem:
            row.append(" / ".join(_mib(r[i].get("extra_info", {}).get("peak_memory_bytes")) if i in r else "-"
                                  for i in mem))
        rows.append(row)
        noted += [r[i] for i in impls if i.startswith("triton") and i in r]
    return _table(header, rows) + _notes(noted, ("volume_gradient_method",))


def epoch_table(benchmarks: list[dict]) -> list[str]:
    """``test_bench_epoch``: seconds per epoch of the quick default, per stage and slices."""
    order = {"taps": 0, "grid_sample": 1}
    rows = []
    for b in sorted(benchmarks, key=lambda b: ((b.get("params") or {}).get("stage", -1),
                                               order.get((b.get("params") or {}).get("impl"), 9))):
        p, info, st = b.get("params") or {}, b.get("extra_info", {}), b["stats"]
        rate = info.get("particles_per_s")
        rows.append([str(p.get("stage", "-")), str(p.get("impl", b.get("name", ""))),
                     f"{st['min']:.2f} s", f"{st['mean']:.2f} s", f"{st['max']:.2f} s", str(st.get("rounds", "-")),
                     "-" if rate is None else f"{rate:.0f}", str(info.get("threads", "-"))])
    return _table(["stage", "slices", "min", "mean", "max", "rounds", "particles/s", "threads"], rows)


def paper_epoch_table(benchmarks: list[dict]) -> list[str]:
    """``test_bench_paper_epoch``: the paper preset's epoch per case, and the simulation."""
    rows = []
    for b in benchmarks:
        info, st = b.get("extra_info", {}), b["stats"]
        if info.get("case") == "simulate":
            rows.append(["simulate", str(info.get("particles", "-")), f"{info.get('simulate_seconds', 0):.1f} s",
                         "-", "-"])
            continue
        minutes = info.get("projected_minutes")
        rows.append([str(info.get("case", b.get("name", ""))), str(info.get("particles", "-")), "-",
                     f"{st['mean']:.2f} s", "-" if minutes is None else f"{minutes:.1f} min"])
    return _table(["case", "particles", "simulation", "seconds per epoch", "preset's epochs (upper bound)"], rows)


def paper_epoch_targets(benchmarks: list[dict]) -> list[str]:
    """Issue 21: <= 4 s per epoch and <= 7 minutes for the preset, and the speed-up over the
    trainer with host round trips."""
    cases = {b.get("extra_info", {}).get("case"): b for b in benchmarks}
    new, old = cases.get("trainer"), cases.get("host_round_trips")
    if new is None:
        return []
    seconds = new["stats"]["mean"]
    lines = [_verdict("paper_epoch, seconds per epoch", seconds, 4.0, False, " s"),
             _verdict("paper_epoch, whole preset", new.get("extra_info", {}).get("projected_minutes"), 7.0, False,
                      " min")]
    if old is not None:
        lines.append(f"paper_epoch, vs the trainer with host round trips: {old['stats']['mean'] / seconds:.3g}x")
    return lines


def generic_table(benchmarks: list[dict]) -> list[str]:
    rows = [[b.get("name", ""), _ms(_mean(b)), str(b["stats"].get("rounds", "-"))] for b in benchmarks]
    return _table(["benchmark", "mean", "rounds"], rows)


TABLES = {"mfn_stack": mfn_table, "project_volume": project_table, "epoch": epoch_table,
          "paper_epoch": paper_epoch_table}


def run_info(runs: list[tuple[str, dict]], benchmarks: list[dict]) -> list[str]:
    """What the JSON files record about the run: files, dates, devices, versions, commit."""
    def join(values):
        values = sorted({str(v) for v in values if v not in (None, "")})
        return ", ".join(values) if values else "not recorded in the JSON"

    mi = [d.get("machine_info", {}) for _, d in runs]
    ci = [d.get("commit_info", {}) for _, d in runs]
    infos = [b.get("extra_info", {}) for b in benchmarks]
    files = sorted({PurePosixPath(b.get("fullname", "").split("::")[0]).name for b in benchmarks} - {""})
    return [
        f"- JSON: {', '.join(f'`{p}`' for p, _ in runs)} (pytest-benchmark {join(d.get('version') for _, d in runs)});"
        f" benchmarks from {', '.join(f'`bench/{f}`' for f in files) or 'unknown files'}",
        f"- date: {join(str(d.get('datetime', ''))[:10] for _, d in runs)};"
        f" device: {join([i.get('device') for i in infos] + [m.get('device_name') for m in mi])};"
        f" host: {join(m.get('node') for m in mi)}, CPU {join(m.get('cpu', {}).get('brand_raw') for m in mi)}",
        f"- torch: {join([m.get('torch_version') for m in mi] + [i.get('torch') for i in infos])};"
        f" triton: {join([m.get('triton_version') for m in mi] + [i.get('triton') for i in infos])};"
        f" python: {join(m.get('python_version') for m in mi)}",
        f"- commit: {join(str(c.get('id', ''))[:7] + (' + changes' if c.get('dirty') else '') for c in ci)}",
    ]


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


def summarize(runs: list[tuple[str, dict]]) -> list[str]:
    """The markdown for ``runs`` (``(path, parsed JSON)`` pairs): a section per table."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for path, data in runs:
        for b in data.get("benchmarks", []):
            groups.setdefault(group_name(b), []).append((path, b))
    order = [g for g in TABLES if g in groups] + sorted(g for g in groups if g not in TABLES)
    out = []
    for g in order:
        # a case measured in several files counts once: the last file given wins
        by_name = {b.get("fullname") or b.get("name"): (path, b) for path, b in groups[g]}
        benchmarks = [b for _, b in by_name.values()]
        paths = {path for path, _ in by_name.values()}
        out += [f"## {g}", ""] + run_info([(p, d) for p, d in runs if p in paths], benchmarks) + [""]
        out += TABLES.get(g, generic_table)(benchmarks) + [""]
        verdicts = [line for line in targets(benchmarks) if line.startswith(g)]
        if g == "paper_epoch":
            out += ["Targets:", ""] + [f"- {v}" for v in paper_epoch_targets(benchmarks)] + [""]
        if g in ("mfn_stack", "project_volume"):
            out += ["Targets (float32 Triton rows):", ""]
            out += [f"- {v}" for v in verdicts] or ["- no Triton rows"]
            out += [""]
    return out


def main(paths: list[str]) -> int:
    runs, failed = [], False
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data.get("benchmarks"), list):
                raise ValueError("no 'benchmarks' list: not a pytest-benchmark JSON file")
        except (OSError, ValueError, AttributeError) as exc:
            print(f"{path}: unreadable ({exc})", file=sys.stderr)
            failed = True
            continue
        runs.append((path, data))
    if not runs:
        print("usage: python bench/summarize.py FILE.json [FILE.json ...] (no readable JSON given)", file=sys.stderr)
        return 1
    print("\n".join(summarize(runs)).rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
