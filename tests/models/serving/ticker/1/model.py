"""ticker: a slow stream; yields COUNT ticks, sleeping TICK_MS before each.

With the optional FAIL_AFTER input it raises RuntimeError after yielding that many ticks.
"""

import time

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        self.produced = 0

    def predict(self, inputs: dict[str, np.ndarray]):
        count = int(inputs["COUNT"][0])
        tick_s = int(inputs["TICK_MS"][0]) / 1000.0
        fail_after = int(inputs["FAIL_AFTER"][0]) if "FAIL_AFTER" in inputs else None
        for tick in range(count):
            if tick == fail_after:
                raise RuntimeError(f"ticker failed after {tick} ticks")
            time.sleep(tick_s)
            self.produced += 1
            yield {"TICK": np.array([tick], np.int32), "PRODUCED": np.array([self.produced], np.int64)}
