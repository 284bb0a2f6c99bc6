"""expand: a small FP32 [16] vector -> a 4 MB FP32 [1000000] tensor.

The output repeats the input 62 500 times (1 000 000 / 16), each copy scaled
by its position: ``EXPANDED[16 * j + i] = INPUT[i] * (j % 4 + 1)``. It is
deterministic and cheap, and every element depends on the input, so a step
that gets it has to receive all 4 MB (the data-locality benchmark's large
intermediate tensor). Its sum is ``62500 * 2.5 * sum(INPUT)``.

No batching (max_batch_size 0): INPUT arrives as [16], EXPANDED leaves as
[1000000].
"""

from __future__ import annotations

import numpy as np

WIDTH = 16
LENGTH = 1_000_000
COPIES = LENGTH // WIDTH  # 62 500
SCALES = (np.arange(COPIES) % 4 + 1).astype(np.float32)  # 1..4, mean 2.5 (4 divides 62 500)


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "expand")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(inputs["INPUT"], dtype=np.float32)
        if x.shape != (WIDTH,):
            raise ValueError(f"{self.name}: INPUT shape {list(x.shape)}, expected [{WIDTH}]")
        expanded = (SCALES[:, None] * x[None, :]).reshape(LENGTH)
        return {"EXPANDED": expanded}
