"""Sharded programs on 8 simulated CPU devices, each in a subprocess: the device count
is fixed when jax is first imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(script: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(Path(__file__).with_name(script))],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_sharded_calibrate_quantize_bit_identical_and_state_stays_sharded():
    assert "OK 40 sharded runs bit-identical" in _run("multidevice_check.py")


@pytest.mark.slow
def test_sharded_lm_qat_step_matches_one_device_and_served_params_stay_sharded():
    # the example LM's QAT step, batch over 'data' and kernel outputs over 'model',
    # gives the single-device losses; serving keeps the sharding; the same for a
    # MaxText-style scanned stack sharded by its logical axis annotations
    out = _run("lm_multidevice_check.py")
    assert "OK sharded QAT losses" in out
    assert "OK scanned sharded QAT losses" in out
