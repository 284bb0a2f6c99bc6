"""fixed_cost: OUTPUT0 = INPUT0 after a fixed 5 ms per call, not per item.

The sleep stands for a GPU kernel launch, whose cost barely depends on the
batch size: a server that batches N requests pays it once, one that does not
pays it N times. With one instance, unbatched throughput is bounded near
1 / 5 ms = 200 requests/s.
"""

from __future__ import annotations

import time

import numpy as np

CALL_COST_S = 0.005


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "fixed_cost")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(CALL_COST_S)
        return {"OUTPUT0": inputs["INPUT0"]}
