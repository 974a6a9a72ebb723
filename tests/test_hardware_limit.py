"""benchmarks/generators.py --hardware-limit: how forward / peak is formed."""
import pytest

from benchmarks.generators import peak_fractions


def test_every_round_is_held_against_the_best_peak_of_the_run():
    """A round whose own peak read low (another job on the core) must not lift its ratio: 100 GFLOP in 1 s against
    peaks of 200 and 80 GFLOP/s is 50 % in both rounds (against its own peak round 2 would read 125 %)."""
    assert peak_fractions(100e9, [1.0, 1.0], [200.0, 80.0]) == pytest.approx([0.5, 0.5])
    assert peak_fractions(100e9, [0.5, 2.0], [100.0, 150.0]) == pytest.approx([4 / 3, 1 / 3])
