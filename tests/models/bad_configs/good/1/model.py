"""Y = X + 1: a valid predictor; whether the model loads depends on its config.pbtxt."""

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": inputs["X"] + np.int32(1)}
