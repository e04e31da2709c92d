"""Render a pytest-benchmark JSON of bench/ into a markdown table (and a PNG plot).

    python bench/render.py results.json [--md out.md] [--png out.png]

Table: one row per (device, workload, op, pass); median milliseconds per implementation, the
best fastgmmdiff backend's speed-up over the best peer, and the PERF.md target for that row
(met / not met).  A peer outside the float64 tolerance is marked with "†" (it is still timed).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

# PERF.md targets: (device, workload, op, pass) -> (peer or "best", ratio).
TARGETS = {
    ("cpu", "diag-cpu", "log_prob", "fwdbwd"): ("matmul", 3.0),
    ("cpu", "diag-cpu", "log_prob", "fwd"): ("sklearn", 10.0),
    ("cpu", "full-cpu", "log_prob", "fwdbwd"): ("compile", 2.0),
    ("cpu", "small", "log_prob", "fwdbwd"): ("best", 2.0),
    ("cpu", "paper", "ngmg", "fwdbwd"): ("best", 2.0),
    ("cuda", "diag-large", "log_prob", "fwdbwd"): ("best", 5.0),
    ("cuda", "full", "log_prob", "fwdbwd"): ("compile", 3.0),
    ("cuda", "small", "log_prob", "fwdbwd"): ("best", 10.0),
    ("cuda", "paper", "ngmg", "fwdbwd"): ("best", 10.0),
    ("cuda", "mdn", "log_prob", "fwdbwd"): ("best", 10.0),
}

ORDER = ["fgd-cpu", "fgd-cuda", "fgd-triton", "fgd-torch", "naive", "matmul", "compile",
         "distributions", "sklearn", "pykeops"]


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        p = b["params"]
        key = (p["dev"], p["wname"], p["op"], p["pass_"])
        info = b.get("extra_info", {})
        rows[key][p["impl"]] = dict(ms=1e3 * b["stats"]["median"], ok=info.get("within_tolerance", True),
                                    mem=info.get("peak_extra_MiB"))
    return data, rows


def summarise(rows):
    out = []
    for key in sorted(rows):
        r = rows[key]
        ours = {k: v for k, v in r.items() if k.startswith("fgd-")}
        peers = {k: v for k, v in r.items() if not k.startswith("fgd-")}
        best_ours = min(ours.items(), key=lambda kv: kv[1]["ms"]) if ours else None
        best_peer = min(peers.items(), key=lambda kv: kv[1]["ms"]) if peers else None
        speedup = best_peer[1]["ms"] / best_ours[1]["ms"] if best_ours and best_peer else None
        target = TARGETS.get(key)
        verdict = ""
        if target and best_ours:
            peer, ratio = target
            ref = best_peer if peer == "best" else (peer, peers.get(peer))
            if ref and ref[1]:
                got = ref[1]["ms"] / best_ours[1]["ms"]
                verdict = f"≥{ratio:g}× {ref[0]}: {got:.1f}× {'met' if got >= ratio else 'NOT met'}"
            else:
                verdict = f"≥{ratio:g}× {peer}: peer not measured"
        out.append(dict(key=key, impls=r, best_ours=best_ours, best_peer=best_peer, speedup=speedup,
                        verdict=verdict))
    return out


def markdown(data, summary):
    impls = [i for i in ORDER if any(i in s["impls"] for s in summary)]
    m = data.get("machine_info", {})
    lines = [f"Machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} logical CPUs; "
             f"python {m.get('python_version', '?')}; date {data.get('datetime', '?')[:10]}", "",
             "| device | workload | op | pass | " + " | ".join(impls) + " | speed-up vs best peer | PERF target |",
             "|" + "---|" * (len(impls) + 6)]
    for s in summary:
        dev, w, op, pass_ = s["key"]
        cells = []
        for i in impls:
            v = s["impls"].get(i)
            cells.append("" if v is None else f"{v['ms']:.3g}{'' if v['ok'] else ' †'}")
        sp = f"{s['speedup']:.1f}× ({s['best_peer'][0]})" if s["speedup"] else ""
        lines.append(f"| {dev} | {w} | {op} | {pass_} | " + " | ".join(cells) + f" | {sp} | {s['verdict']} |")
    lines += ["", "Median ms. † outside the float64 tolerance (1e-5 value, 1e-4 gradients)."]
    return "\n".join(lines)


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["speedup"]]
    labels = [f"{s['key'][0]} {s['key'][1]} {s['key'][2]} {s['key'][3]}" for s in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [s["speedup"] for s in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("best fastgmmdiff backend: speed-up over the best peer (median, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json")
    ap.add_argument("--md")
    ap.add_argument("--png")
    a = ap.parse_args(argv)
    data, rows = load(a.json)
    summary = summarise(rows)
    md = markdown(data, summary)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.png:
        plot(summary, a.png)


if __name__ == "__main__":
    main()
