"""The README's result tables are the files the commands wrote (issue 12): the reproduction tables are
results/embedded/results.md's (the main one and each attack × defence matrix), the drift table is
the recipe's drift step's summary.md, the benchmark table is `run_all.py --collect --markdown` over
the committed records. Rerun a command and these fail until the README quotes its new output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables(text: str) -> list[list[str]]:
    """Every Markdown table in `text`: its runs of lines starting with '|'."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_the_reproduction_tables_are_results_md() -> None:
    written = _tables((ROOT / "results/embedded/results.md").read_text())  # the main table, then one per attack row
    assert len(written) >= 4 and len(written[0]) > 10
    readme = _tables((ROOT / "README.md").read_text())
    for table in written:
        assert table in readme, f"README lacks this table of results/embedded/results.md:\n{table[0]}\n{table[2]}"


def test_the_drift_table_is_the_drift_steps_summary() -> None:
    written = _tables((ROOT / "results/embedded/drift/summary.md").read_text())[0]
    assert len(written) > 5
    assert written in _tables((ROOT / "README.md").read_text())


def test_the_benchmark_table_is_what_run_all_collects(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "benchmarks/run_all.py", "--collect", "--markdown", "--out", str(tmp_path / "s.json")],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    collected = _tables(out)[0]
    assert len(collected) > 20
    assert collected in _tables((ROOT / "README.md").read_text())
