"""benchmarks/compressed_size.py: the size ratios it prints and a round trip of the timed weight (nothing timed)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reports_sizes_and_both_timings(capsys):
    bench = load_benchmark("compressed_size")
    assert bench.main(["--shape", "8", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "120,960 compressed bytes / 221,184 dense bytes = 0.5469" in out  # 35/64, as in test_compressed.py
    assert "compress_tensor" in out and "decompress_tensor" in out
