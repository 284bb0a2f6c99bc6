"""reduce: a FP32 [1000000] tensor -> its sum and mean, FP32 [2].

Summed in float64, then rounded to float32, so the result does not depend
on the order numpy adds in. No batching (max_batch_size 0).
"""

from __future__ import annotations

import numpy as np

LENGTH = 1_000_000


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "reduce")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(inputs["EXPANDED"], dtype=np.float32)
        if x.shape != (LENGTH,):
            raise ValueError(f"{self.name}: EXPANDED shape {list(x.shape)}, expected [{LENGTH}]")
        total = float(x.sum(dtype=np.float64))
        return {"SUMMARY": np.array([total, total / LENGTH], dtype=np.float32)}
