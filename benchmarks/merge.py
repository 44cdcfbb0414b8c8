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
    return (r["spec"]["label"],)


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
    meta["skipped"] = sorted(set(old.get("meta", {}).get("skipped", [])) | set(meta.get("skipped", [])))
    meta["notes"] = list(dict.fromkeys(old.get("meta", {}).get("notes", []) + meta.get("notes", [])))
    merged["meta"] = meta
    if "latency" in old:
        if "latency" in new:
            raw = _merge_rows(old["latency"].get("raw", []), new["latency"].get("raw", []), _latency_key)
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
            q["notes"] = list(dict.fromkeys(old["quality"].get("notes", []) + new["quality"].get("notes", [])))
            merged["quality"] = q
        else:
            merged["quality"] = old["quality"]
    return merged
