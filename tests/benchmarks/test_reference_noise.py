"""benchmarks/reference_noise.py on the synthetic checkpoint: every row printed, and the two rows
whose values are known (the text-only prompt with every row text is the method's own mask)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import reference_noise  # noqa: E402


def test_the_table_of_the_synthetic_checkpoint(tmp_path, capsys, single_thread):
    assert reference_noise.main(["--checkpoint", "synthetic", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split(":")[0].strip(): line.split(":", 1)[1].split() for line in out.splitlines()[1:] if ":" in line}
    assert len(rows) == len(reference_noise.PROMPTS) * 6  # 3 noise levels, 2 masks, unquantized
    cell = re.compile(r"^\d\.\de[+-]\d\d/\d\.\de[+-]\d\d/\d\.\de[+-]\d\d$")
    assert all(cell.match(c) for cells in rows.values() for c in cells)
    assert all(len(rows[f"{p:10s} noise {e:.0e}".strip()]) == reference_noise.SEEDS for p in reference_noise.PROMPTS for e in (1e-7, 1e-6, 1e-5))
    assert rows["text_only  every row text"] == ["0.0e+00/0.0e+00/0.0e+00"]
    largest = [float(c.split("/")[0]) for c in rows["one_image  unquantized"]]
    assert largest[0] > 1e-2  # the unquantized model is not the checkpoint
