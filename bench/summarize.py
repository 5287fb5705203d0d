"""Print pytest-benchmark JSON files as one table: mean time, throughput, peak memory."""

import json
import sys

for path in sys.argv[1:]:
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as exc:
        print(f"{path}: unreadable ({exc})")
        continue
    print(f"## {path} ({data['machine_info'].get('node', '')})")
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        rate = info.get("points_per_s") or info.get("projections_per_s")
        mem = info.get("peak_memory_bytes")
        print(f"{b['name']:<70} {b['stats']['mean'] * 1e3:9.3f} ms  "
              f"{rate or 0:10.4g}/s  {(mem or 0) / 2**20:9.1f} MiB  {info.get('precision', '')}")
        # what the first calls chose by timing (mfn_stack strategies, projector gradient)
        for k in ("strategies", "volume_gradient_method"):
            if info.get(k):
                print(f"    {k}: {info[k]}")
