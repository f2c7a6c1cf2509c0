"""Benchmarks write their own section of benchmarks/RESULTS.md (other sections are kept)."""
from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by the benchmarks themselves (`python benchmarks/NAME.py`); each section is replaced on its benchmark's next run.\n"


def machine_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{datetime.date.today()} · {platform.machine()} · {device} · torch {torch.__version__}"


def _section_pattern(section: str) -> re.Pattern[str]:
    return re.compile(re.escape(f"<!-- begin {section} -->") + r".*?" + re.escape(f"<!-- end {section} -->"), re.S)


def _write_block(section: str, block: str, path: Path) -> None:
    text = path.read_text() if path.exists() else HEADER
    pattern = _section_pattern(section)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def update_results(section: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `## {section}` of RESULTS.md (or of `path`) with `markdown`."""
    block = f"<!-- begin {section} -->\n## {section}\n\n_{machine_line()}_\n\n{markdown.strip()}\n<!-- end {section} -->"
    _write_block(section, block, path)


def copy_section(section: str, source: Path, path: Path = RESULTS) -> None:
    """Put the section `## {section}` of another results file (one a device run wrote) into RESULTS.md as is."""
    found = _section_pattern(section).search(source.read_text())
    if found is None:
        raise ValueError(f"{source} has no `{section}` section")
    _write_block(section, found.group(0), path)
