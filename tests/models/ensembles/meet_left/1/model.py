"""meet_left / meet_right: OUT = IN; both must be running at once (a shared Barrier).

Steps of an ensemble that depend on the same tensor only run concurrently if the
executor starts both; run one after the other, the Barrier times out and fails.
"""

import sys
import threading
import types

_SHARED = sys.modules.setdefault("meshserve_test_meet", types.ModuleType("meshserve_test_meet"))
if not hasattr(_SHARED, "barrier"):
    _SHARED.barrier = threading.Barrier(2)
# Bounds a broken executor; both steps start within milliseconds of each other.
_MEET_TIMEOUT_S = 10.0


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        _SHARED.barrier.wait(_MEET_TIMEOUT_S)
        return {"OUT": inputs["IN"]}
