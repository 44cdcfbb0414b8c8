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
             ""] + [f"- {n}" for n in meta.get("notes", [])] + ["", headline_tables(results), "",
             f"Full report with XNNPACK on/off, ops outside XNNPACK, Android `benchmark_model` command lines, "
             f"pipeline stage costs and quality by mask kind and size: [{report_link}]({report_link}). "
             "A full run (default model exported to artifacts/, both shapes, 1 and 2 threads, 10 timed runs) is "
             "`make bench`; add `--update-readme` to `gmcnn-mobile bench` to rewrite this section. "
             + ("The tables above came from these runs, in order (`--merge`: a later run's rows replace an "
                "earlier run's rows with the same key):" if meta.get("merged_from") else "The tables above came from:"),
             "", "```sh"] + _commands(meta) + ["```", END]
    return "\n".join(lines)


def _commands(meta: dict) -> list:
    """The run's command, preceded by those of the earlier runs merged into it (``--merge``)."""
    earlier = [m["command"] for m in meta.get("merged_from", []) if m.get("command")]
    return list(dict.fromkeys(earlier + [meta["command"]]))


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


def main(argv=None) -> int:
    """``python -m benchmarks.readme RESULTS.json [README.md] [REPORT_LINK]``: rewrite the README's
    benchmark section from a finished run without measuring again."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__, file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    readme = Path(argv[1]) if len(argv) > 1 else Path("README.md")
    update_readme(readme, results, argv[2] if len(argv) > 2 else "docs/benchmarks/report.md")
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
