"""benchmarks/optimizer_step.py: it times StepAdamW in both phases against fused AdamW (structure only, nothing timed)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_phases_are_measured(capsys):
    bench = load_benchmark("optimizer_step")
    assert bench.main(["--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    phases = [line.split()[0:2] for line in lines if line.startswith(("before switch", "after switch"))]
    assert phases == [["before", "switch"], ["after", "switch"]]
    step_adamw, _ = bench.build(0, rounds=2)
    assert step_adamw.max_step == 6 and not step_adamw.switched  # T_max after the dense phase's 2 + 2 steps
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
