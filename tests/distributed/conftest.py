"""Distributed tests: 2 gloo ranks on the CPU, spawned once per test module (gw_dist_harness)."""

from __future__ import annotations

import sys
from pathlib import Path

# The spawned ranks import the scenarios by module name: make this folder importable.
sys.path.insert(0, str(Path(__file__).parent))
