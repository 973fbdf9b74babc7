"""Sharded arrays on 8 simulated CPU devices (run in a subprocess: the device count
is fixed when jax is first imported)."""

import os
import subprocess
import sys
from pathlib import Path


def test_sharded_calibrate_quantize_bit_identical_and_state_stays_sharded():
    script = Path(__file__).with_name("multidevice_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK 40 sharded runs bit-identical" in result.stdout
