"""Shared fixtures. Tiny models are built once per session (seeded) and exported on demand."""

from __future__ import annotations

import os

# Two torch threads on two cores are slower than one when the other core is busy (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
from fixtures_sam import *  # noqa: F401,F403
from fixtures_models import *  # noqa: F401,F403
from fixtures_runtime import *  # noqa: F401,F403
from fixtures_phi3v import *  # noqa: F401,F403
from fixtures_phi3v_runtime import *  # noqa: F401,F403
from fixtures_fastvlm import *  # noqa: F401,F403
