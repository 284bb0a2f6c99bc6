"""slow: sleeps for the largest DELAY_MS of the batch, then echoes DELAY_MS as DONE_MS."""

import time

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        delay_ms = inputs["DELAY_MS"]
        time.sleep(float(delay_ms.max()) / 1000.0)
        return {"DONE_MS": delay_ms.copy()}
