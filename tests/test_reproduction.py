"""Reproduction guard: every class-incremental method, on the shrunk seeded Split CIFAR-10 stream, must reach
the average incremental accuracy stored in tests/reference/split_cifar10.json.

Refresh the references after an intended change of a method's accuracy (and say why in the commit):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_cifar10.py --root <cifar10> --write-reference
"""

import json
from pathlib import Path

import pytest

REFERENCE = json.loads((Path(__file__).parent / "reference" / "split_cifar10.json").read_text())

#: Tolerance in accuracy points. The runs are seeded and deterministic: on one machine with the same libraries
#: they repeat exactly (Finetune gave 30.55 in every run so far). Another CPU or library version changes the
#: rounding and the run drifts like a change of seed; over seeds 0, 1, 2 the average incremental accuracy
#: moved by a standard deviation of 1.6 (Finetune 30.55 / 29.41 / 32.60, LwF 35.18 / 34.54 / 32.17; see
#: benchmarks/README.md). 3 points (about 2 sd) still catch LwF falling back to Finetune (-4.6) and any break
#: of iCaRL, WA, BiC, DER or Joint (10 to 25 points above Finetune). EWC's average is within noise of Finetune's at
#: this budget: its own effect is tested on the first task (tests/methods/test_families.py).
TOLERANCE = 3.0


@pytest.mark.parametrize("method", sorted(REFERENCE["avg_incremental_accuracy"]))
def test_method_reaches_its_reference_accuracy(split_cifar10, method):
    expected = REFERENCE["avg_incremental_accuracy"][method]
    got = split_cifar10(method)["summary"]["avg_incremental_accuracy"]
    assert abs(got - expected) <= TOLERANCE, f"{method}: {got:.2f} vs reference {expected:.2f} ± {TOLERANCE}"
