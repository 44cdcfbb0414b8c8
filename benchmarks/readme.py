"""The README's benchmark section, generated from a run's results between fixed markers."""
from __future__ import annotations

from pathlib import Path

from .report import headline_tables, portable, write_atomic

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def readme_section(results: dict, report_link: str = "docs/benchmarks/report.md") -> str:
    """The headline tables, the machine they were measured on and the one command that reproduces them;
    the notes, every merged run and its command stay in the full report."""
    results = portable(results)
    lines = [START, "## Benchmarks", "", "Each table follows the line that says when, on which CPU, at what load and from which "
             "checkpoint its newest run measured it; rows that run did not measure again stay from earlier runs "
             "([the report](" + report_link + ") lists every run and its command).", "", headline_tables(results), "",
             "Reproduce (from the repository root; exports the default model to `artifacts/` and writes "
             "`bench-results/`):", "", "```sh", "make bench", "```", "",
             f"`make bench` runs `gmcnn-mobile bench --artifacts artifacts --out bench-results`; add "
             f"`--update-readme README.md` to rewrite this section from a run. The full report -- XNNPACK on/off, "
             f"ops outside XNNPACK, the convolution ceiling, Android `benchmark_model` command lines, pipeline stage "
             f"costs, quality by mask kind and size, and the runs and notes behind these tables with their "
             f"commands: [{report_link}]({report_link}).", END]
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
