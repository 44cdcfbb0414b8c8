"""Merging a run into an earlier run's results.json (``--merge``), so sections can be measured
in separate invocations (e.g. quality once the trained model is exported, latency at another
thread count) and reported together. A row of the new run replaces the earlier row with the
same key; every section keeps the artifacts and checkpoint it was measured with."""
from __future__ import annotations

from typing import Callable, Dict, List


def _merge_rows(old: List[dict], new: List[dict], key: Callable[[dict], tuple]) -> List[dict]:
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + list(new)


def _latency_key(r: dict) -> tuple:
    """A row's identity across merged runs: its label; a convolution ceiling's also its run, so that every merged
    run keeps the ceiling its own model rows are divided by (benchmarks.latency.derive)."""
    if r["spec"].get("role") == "roofline":
        return (r["spec"]["label"], r.get("run"))
    return (r["spec"]["label"],)


def _tagged(rows: List[dict], started) -> List[dict]:
    """``rows`` (latency results) each with the run it was measured in (``run``: that run's start time), where
    not tagged by an earlier merge."""
    return [r if "run" in r else dict(r, run=started) for r in rows]


def _merge_latency_raw(old: List[dict], new: List[dict]) -> List[dict]:
    """Rows of ``new`` replace ``old`` rows with the same label, except SGEMM rows: the peak is the
    best any merged run reached (a shared VM's speed drifts between runs, and a run that starts while
    another process winds down measures a lower one); every measurement is kept in ``gmac_per_s_measured``."""
    old_sgemm = {_latency_key(r): r for r in old if r["spec"]["kind"] == "sgemm" and r.get("ok")}
    out = _merge_rows(old, new, _latency_key)
    for i, r in enumerate(out):
        prev = old_sgemm.get(_latency_key(r))
        if prev is None or prev is r or not r.get("ok"):
            continue
        measured = list(prev.get("gmac_per_s_measured", [prev["gmac_per_s"]])) + \
            list(r.get("gmac_per_s_measured", [r["gmac_per_s"]]))
        best = prev if prev["gmac_per_s"] > r["gmac_per_s"] else r
        out[i] = dict(best, gmac_per_s_measured=measured)
    return out


_BUDGET = "--time-budget spent"


def _budget_skips_still_missing(skipped: List[str], merged: dict) -> List[str]:
    """Drop the '--time-budget spent' entries of any run that a merged run has since measured.

    Latency entries name their label; quality entries are replaced by one line computed from the
    merged section's planned and scored cases."""
    measured = {r["spec"]["label"] for r in merged.get("latency", {}).get("raw", []) if r.get("ok")}
    keep = []
    for entry in skipped:
        if _BUDGET in entry and entry.startswith("latency ") and entry[len("latency "):].split(":")[0] in measured:
            continue
        if _BUDGET in entry and entry.startswith("quality:"):
            continue
        keep.append(entry)
    missing = quality_cases_missing(merged.get("quality") or {})
    if missing:
        keep.append(quality_missing_line(missing, len(merged["quality"].get("planned", []))))
    return sorted(set(keep))


def quality_cases_missing(quality: dict) -> List[list]:
    """Planned ``[photo, kind, size, seed]`` cases without a scored row."""
    done = {(r["photo"], r["kind"], r["size"], r["seed"]) for r in quality.get("rows", [])}
    return [c for c in quality.get("planned", []) if tuple(c) not in done]


def quality_missing_line(missing: List[list], planned: int) -> str:
    cells = sorted({f"{kind}/{size}" for _, kind, size, _ in missing})
    return f"quality: {len(missing)} of {planned} planned cases not scored ({', '.join(cells)}; {_BUDGET})"


def merge_results(old: dict, new: dict, derive_latency: Callable[[List[dict], Dict[str, int]], dict]) -> dict:
    """``new`` with the sections and rows of ``old`` it did not measure again."""
    merged = dict(new)
    meta = dict(new["meta"])
    meta["merged_from"] = list(old.get("meta", {}).get("merged_from", [])) + [
        {"command": old.get("meta", {}).get("command"), "started": old.get("meta", {}).get("started")}]
    for key in ("macs",):
        combined = dict(old.get("meta", {}).get(key) or {})
        combined.update(meta.get(key) or {})
        meta[key] = combined
    meta["notes"] = list(dict.fromkeys(old.get("meta", {}).get("notes", []) + meta.get("notes", [])))
    merged["meta"] = meta
    if "latency" in old:
        if "latency" in new:
            raw = _merge_latency_raw(_tagged(old["latency"].get("raw", []), old.get("meta", {}).get("started")),
                                     _tagged(new["latency"].get("raw", []), meta.get("started")))
            lat = derive_latency(raw, meta.get("macs") or {})
            lat["raw"] = raw
            lat["source"] = {**old["latency"].get("source", {}), **new["latency"].get("source", {})}
            merged["latency"] = lat
            merged["android"] = _merge_rows(old.get("android", []), new.get("android", []), lambda r: (r["label"],))
        else:
            merged["latency"] = old["latency"]
            merged["android"] = old.get("android", [])
    if "pipeline" in old:
        if "pipeline" in new:
            p = dict(new["pipeline"])
            p["rows"] = _merge_rows(old["pipeline"]["rows"], new["pipeline"]["rows"],
                                    lambda r: (r.get("model", ""), r["photo"], r["mode"], r["tiles"], r.get("threads"),
                                               r.get("precision")))
            p["notes"] = list(dict.fromkeys(old["pipeline"].get("notes", []) + new["pipeline"].get("notes", [])))
            merged["pipeline"] = p
        else:
            merged["pipeline"] = old["pipeline"]
    if "quality" in old:
        if "quality" in new:
            q = dict(new["quality"])
            q["rows"] = _merge_rows(old["quality"]["rows"], new["quality"]["rows"],
                                    lambda r: (r["photo"], r["kind"], r["size"], r["seed"], r["method"], r.get("model", "")))
            q["cases"] = len({(r["photo"], r["kind"], r["size"], r["seed"]) for r in q["rows"]})
            q["planned"] = [list(c) for c in dict.fromkeys(
                tuple(c) for c in old["quality"].get("planned", []) + new["quality"].get("planned", []))]
            q["notes"] = list(dict.fromkeys(old["quality"].get("notes", []) + new["quality"].get("notes", [])))
            merged["quality"] = q
        else:
            merged["quality"] = old["quality"]
    meta["skipped"] = _budget_skips_still_missing(
        list(old.get("meta", {}).get("skipped", [])) + list(meta.get("skipped", [])), merged)
    return merged
