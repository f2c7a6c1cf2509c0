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


def update_results(section: str, markdown: str) -> None:
    """Replace (or append) the section `## {section}` of RESULTS.md with `markdown`."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = f"{begin}\n## {section}\n\n_{machine_line()}_\n\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
