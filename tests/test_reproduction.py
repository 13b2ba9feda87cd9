"""Reproduction guard: every class-incremental method, on the shrunk seeded Split CIFAR-10 stream, must reach
the average incremental accuracy stored in tests/reference/split_cifar10.json.

Refresh the references after an intended change of a method's accuracy (and say why in the commit):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_cifar10.py --root <cifar10> --write-reference
"""

import json
from pathlib import Path

import pytest

REFERENCE = json.loads((Path(__file__).parent / "reference" / "split_cifar10.json").read_text())

#: Tolerance in accuracy points, per method (tests/reference/split_cifar10.json). The runs are seeded and
#: deterministic: on one machine with the same libraries they repeat exactly (Finetune gave 30.55 in every run so
#: far). Another CPU or library version changes the rounding and the run drifts like a change of seed. Over seeds
#: 0, 1, 2 the average incremental accuracy had a standard deviation of 1.6 for Finetune (30.55 / 29.41 / 32.60)
#: and LwF (35.18 / 34.54 / 32.17, before the distillation fix), and 3.3 for iCaRL (54.68 / 51.25 / 48.08); see
#: benchmarks/README.md. The tolerance is about 2 sd: 3 points by default, 6.5 for the rehearsal methods (iCaRL's
#: spread, assumed for WA, BiC and DER, which were not measured). That still catches LwF falling back to Finetune
#: (-5.4) and a rehearsal method losing its memory or correction (16 to 24 points above Finetune). EWC's average
#: is 3-5 points above Finetune's at this budget, near the noise; its own effect is tested on the old tasks
#: (tests/methods/test_families.py). Its seed-0 average was 35.66 on the machine that wrote the reference and 32.51
#: on another (seeds 1, 2 there: 33.49, 34.64; LwF 34.36 / 34.33 / 37.68 against its reference 35.91), so EWC's
#: tolerance is 4 points.
TOLERANCE = REFERENCE["tolerance"]


#: Split CIFAR-10 runs of 2-5 min each on 2 cores that the default suite leaves to `pytest -m slow` (it keeps
#: Finetune's, which other tests share): Joint trains on all data seen so far, DER grows an extractor per task; LwF,
#: EWC, WA, BiC, and iCaRL (3.5 min; it left the default suite when the pre-trained-model tests joined it).
SLOW_METHODS = {"joint", "der", "lwf", "ewc", "wa", "bic", "icarl"}


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=pytest.mark.slow) if m in SLOW_METHODS else m
        for m in sorted(REFERENCE["avg_incremental_accuracy"])
    ],
)
def test_method_reaches_its_reference_accuracy(split_cifar10, method):
    expected = REFERENCE["avg_incremental_accuracy"][method]
    tolerance = TOLERANCE.get(method, TOLERANCE["default"])
    got = split_cifar10(method)["summary"]["avg_incremental_accuracy"]
    assert abs(got - expected) <= tolerance, f"{method}: {got:.2f} vs reference {expected:.2f} ± {tolerance}"
