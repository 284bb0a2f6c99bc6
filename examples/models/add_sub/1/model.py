"""add_sub: OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1.

Both inputs are FP32 with per-request dims [16]. The config sets
max_batch_size 64, so the runtime hands over arrays shaped [batch, 16]
(several requests concatenated on axis 0); the outputs keep that shape.
"""

from __future__ import annotations

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "add_sub")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = np.asarray(inputs["INPUT0"], dtype=np.float32)
        b = np.asarray(inputs["INPUT1"], dtype=np.float32)
        if a.shape != b.shape:
            raise ValueError(
                f"{self.name}: INPUT0 shape {list(a.shape)} and INPUT1 shape {list(b.shape)} differ"
            )
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
