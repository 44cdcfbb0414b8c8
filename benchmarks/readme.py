"""The README's benchmark section, generated from a run's results between fixed markers."""
from __future__ import annotations

from pathlib import Path

from .report import headline_tables, write_atomic

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def readme_section(results: dict, report_link: str = "docs/benchmarks/report.md") -> str:
    meta = results["meta"]
    lines = [START, "## Benchmarks", "",
             f"Latest run: {meta['started'][:10]}, {meta['cpu']} ({meta['cpu_count']} cores), TFLite via LiteRT "
             f"{meta['versions'].get('ai-edge-litert', '?')} with XNNPACK. {meta['contention_note']}",
             "", headline_tables(results), "",
             f"Full report with XNNPACK on/off, ops outside XNNPACK, Android `benchmark_model` command lines, "
             f"pipeline stage costs and quality by mask kind and size: [{report_link}]({report_link}). Regenerate with:",
             "", "```sh", meta["command"], "```", END]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers (markers included) replaced by ``section``;
    the section is appended when the markers are absent."""
    start, end = text.find(START), text.find(END)
    if start != -1 and end != -1 and end > start:
        return text[:start] + section + text[end + len(END):]
    sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + section + "\n"


def update_readme(path: Path, results: dict, report_link: str = "docs/benchmarks/report.md") -> None:
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    write_atomic(path, replace_section(text, readme_section(results, report_link)))
