"""Root cause on real faults: meshlens vs NSigma and BARO on the Online Boutique half of Nezha (FSE'23).

    .venv/bin/python benchmarks/eval_nezha.py [--mirror DIR] [--json OUT] [--case SUBSTRING]

Each labelled fault whose pre-fault and fault minutes the mirror holds (see :mod:`nezha`) is rendered as
the Istio sidecar records its traces imply (client + server record per RPC, real durations), ingested with
the real ingest into a temporary store, and analysed:

* **meshlens**: ``rootcause.analyze`` for the entry service (``frontend``) over the whole window -- it finds
  the onset itself; a candidate counts when it is the labelled service or an edge into it;
* **NSigma** and **BARO** (Pham et al., FSE'24: its RobustScorer) on the same records, *given the fault
  time*: per-service metrics in 5 s buckets (mean server-side duration per operation, request count per
  operation), each scored by its largest ``|x - mean| / sd`` (NSigma) or ``|x - median| / IQR`` (BARO)
  in the fault period against the pre-fault period; a service scores its best metric.

"Logs carry the fault" (the target's denominator) is decided with the label, independently of every
method: some group of the root-cause service's own records -- its inbound records per operation, or its
callers' outbound records to it, or its outbound records -- is slower after the injection than before
(one-sided Mann-Whitney p < 0.001 and median +25 % or p90 +50 %). A fault that changes only return values
leaves none: there, the right answer is "no signal", which is scored separately.

The mirror path: ``--mirror``, else ``$MESHLENS_NEZHA``, else ``/work/.mirror/IntelligentDDS+Nezha/repo``;
when absent the run is skipped with the reason (exit 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nezha  # noqa: E402

BUCKET_S = 5
ENTRY = "frontend"


# ------------------------------------------------------------------------------------------------
# visibility oracle (uses the label; decides the denominator only)
# ------------------------------------------------------------------------------------------------


def _mw_p_greater(after: np.ndarray, before: np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value (normal approximation, tie-corrected) that ``after`` > ``before``."""
    n1, n2 = len(after), len(before)
    allv = np.concatenate([after, before])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    _, first, counts = np.unique(sv, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    tie = (counts ** 3 - counts).sum() / (n * (n - 1)) if n > 1 else 0
    var = n1 * n2 / 12 * ((n + 1) - tie)
    if var <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / np.sqrt(var)
    from math import erfc, sqrt
    return 0.5 * erfc(z / sqrt(2))


def visible(records: pd.DataFrame, service: str, inject_ns: int) -> tuple[bool, str]:
    r = records.assign(svc=records["pod"].map(nezha.service_of))
    groups = {
        "inbound": r[(r["direction"] == "inbound") & (r["svc"] == service)],
        "calls into it": r[(r["direction"] == "outbound") & (r["callee"] == service)],
        "its outbound calls": r[(r["direction"] == "outbound") & (r["svc"] == service)],
    }
    for what, g in groups.items():
        for op, sub in g.groupby("op"):
            b = sub[sub["start_ns"] < inject_ns]["dur_us"].to_numpy(float)
            a = sub[sub["start_ns"] >= inject_ns]["dur_us"].to_numpy(float)
            if len(b) < 8 or len(a) < 8:
                continue
            p = _mw_p_greater(a, b)
            med = np.median(a) / max(np.median(b), 1)
            p90 = np.quantile(a, 0.9) / max(np.quantile(b, 0.9), 1)
            if p < 1e-3 and (med >= 1.25 or p90 >= 1.5):
                return True, f"{what} {op}: median x{med:.1f}, p90 x{p90:.1f} (p={p:.1e})"
    return False, "no group of its records changed"


# ------------------------------------------------------------------------------------------------
# baselines (given the fault time)
# ------------------------------------------------------------------------------------------------


def _metrics(records: pd.DataFrame) -> pd.DataFrame:
    """Per 5 s bucket, per (service, metric): mean server-side duration and request count per operation."""
    inb = records[records["direction"] == "inbound"].assign(svc=lambda d: d["pod"].map(nezha.service_of))
    inb = inb.assign(bucket=inb["start_ns"] // (BUCKET_S * 10**9))
    g = inb.groupby(["bucket", "svc", "op"])["dur_us"]
    lat = g.mean().unstack(["svc", "op"])
    cnt = g.size().unstack(["svc", "op"])
    lat.columns = [(s, f"latency {o}") for s, o in lat.columns]
    cnt.columns = [(s, f"count {o}") for s, o in cnt.columns]
    m = pd.concat([lat.ffill().bfill(), cnt.fillna(0)], axis=1)
    full = np.arange(m.index.min(), m.index.max() + 1)
    return m.reindex(full).ffill().bfill()


def baseline_rank(records: pd.DataFrame, inject_ns: int, method: str) -> list[str]:
    m = _metrics(records)
    t = inject_ns // (BUCKET_S * 10**9)
    normal, anomal = m[m.index < t], m[m.index >= t]
    if len(normal) < 2 or anomal.empty:
        return []
    if method == "nsigma":
        centre, scale = normal.mean(), normal.std(ddof=0)
    else:  # BARO RobustScorer: median and inter-quartile range of the normal period
        centre, scale = normal.median(), normal.quantile(0.75) - normal.quantile(0.25)
    z = ((anomal - centre).abs() / scale.replace(0, np.nan)).max()
    z = z.replace([np.inf], np.nan).dropna()
    z.index = pd.MultiIndex.from_tuples(z.index)
    per = z.groupby(level=0).max().sort_values(ascending=False)
    return [str(s) for s in per.index]


# ------------------------------------------------------------------------------------------------
# meshlens
# ------------------------------------------------------------------------------------------------


def meshlens_rank(db: Path) -> tuple[list[str], dict]:
    from meshlens.analysis import rootcause
    from meshlens.store import open_store

    with open_store(str(db), read_only=True) as store:
        rep = rootcause.analyze(store, ENTRY)
    out: list[str] = []
    for r in rep.candidates.itertuples(index=False):
        svc = str(r.target).split("->")[-1] if r.kind == "edge" else str(r.target)
        if svc not in out:
            out.append(svc)
    info = {"message": rep.message, "onset": rep.onset.as_dict()["onset"] if rep.onset else None,
            "top": rep.candidates.head(3)[["kind", "target", "score"]].to_dict("records")}
    return out, info


def run_case(mirror: Path, case: nezha.Case, work: Path) -> dict:
    from meshlens.ingest import ingest_files

    spans = nezha.read_spans(mirror, case)
    recs = nezha.rpc_records(spans)
    ok, why = nezha.coverage(recs, case.inject_ns)
    if not ok:
        return {"case": case.name, "skipped": why}
    d = work / case.name.replace(":", "")
    files = nezha.render(recs, d / "logs")
    db = d / "store.duckdb"
    ingest_files(str(db), [str(f) for f in files], progress=False)
    vis, why = visible(recs, case.service, case.inject_ns)
    t = time.perf_counter()
    ml, info = meshlens_rank(db)
    secs = time.perf_counter() - t
    res = {"case": case.name, "kind": case.kind, "truth": case.service, "visible": vis, "why": why,
           "records": len(recs), "seconds": round(secs, 2), "meshlens": ml[:5], "meshlens_info": info}
    for method in ("nsigma", "baro"):
        res[method] = baseline_rank(recs, case.inject_ns, method)[:5]
    return res


def summarize(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    for m in ("meshlens", "nsigma", "baro"):
        df[f"{m}_top1"] = [bool(r) and r[0] == t for r, t in zip(df[m], df["truth"], strict=True)]
        df[f"{m}_top3"] = [t in r[:3] for r, t in zip(df[m], df["truth"], strict=True)]
    df["meshlens_none"] = [not r for r in df["meshlens"]]
    lines = ["", f"Nezha Online Boutique: {len(df)} usable cases, {int(df['visible'].sum())} whose logs carry "
             "the fault", "",
             "| fault kind | n (visible) | meshlens top-1 | top-3 | NSigma top-1 | top-3 | BARO top-1 | top-3 |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name: str, sub: pd.DataFrame) -> str:
        v = sub[sub["visible"]]
        if v.empty:
            return f"| {name} | 0 ({len(sub)}) | - | - | - | - | - | - |"
        cells = [f"{int(v[f'{m}_top{k}'].sum())}/{len(v)}" for m in ("meshlens", "nsigma", "baro") for k in (1, 3)]
        return f"| {name} | {len(v)} ({len(sub)}) | " + " | ".join(cells) + " |"

    for kind, sub in df.groupby("kind"):
        lines.append(row(str(kind), sub))
    lines.append(row("**all**", df))
    inv = df[~df["visible"]]
    if not inv.empty:
        lines += ["", f"invisible cases: {len(inv)}; meshlens says 'no signal' on {int(inv['meshlens_none'].sum())}"]
    lines += ["", f"meshlens analysis time per case: median {df['seconds'].median():.2f} s", ""]
    for r in df.itertuples(index=False):
        mark = "ok " if r.meshlens_top1 else ("-- " if not r.visible else "MISS")
        lines.append(f"{mark} {r.case} vis={r.visible} meshlens={r.meshlens[:3]} nsigma={r.nsigma[:3]} "
                     f"baro={r.baro[:3]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", help=f"Nezha bare git dir (default ${nezha.MIRROR_ENV} or {nezha.DEFAULT_MIRROR})")
    ap.add_argument("--json", help="write the per-case results here")
    ap.add_argument("--case", help="only cases whose name contains this")
    args = ap.parse_args(argv)
    mirror = nezha.mirror_path(args.mirror)
    if not (mirror / "HEAD").exists():
        print(f"skipped: no Nezha mirror at {mirror} (fetch github:IntelligentDDS/Nezha, or pass --mirror)")
        return 0
    cases = nezha.load_cases(mirror)
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshlens-nezha-") as tmp:
        for case in cases:
            ok, why = case.usable
            if args.case and args.case not in case.name:
                continue
            if not ok:
                print(f"skip {case.name}: {why}")
                continue
            res = run_case(mirror, case, Path(tmp))
            if "skipped" in res:
                print(f"skip {case.name}: {res['skipped']}")
                continue
            print(f"{case.name}: truth {res['truth']} visible={res['visible']} meshlens {res['meshlens'][:3]} "
                  f"nsigma {res['nsigma'][:3]} baro {res['baro'][:3]}", flush=True)
            rows.append(res)
    if not rows:
        print("no usable case")
        return 0
    print(summarize(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
