"""The example LM's QAT step sharded over 8 simulated CPU devices (batch over 'data',
kernels' outputs over 'model') gives the single-device losses, and serving keeps the
sharding; in a subprocess, since the device count is fixed when jax is imported."""

import os
import subprocess
import sys
from pathlib import Path


def test_sharded_lm_qat_step_matches_one_device_and_served_params_stay_sharded():
    script = Path(__file__).with_name("lm_multidevice_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK sharded QAT losses" in result.stdout
