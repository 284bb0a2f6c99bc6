"""SCORES = softmax(LOGITS), per row."""

import numpy as np


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        logits = inputs["LOGITS"]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {"SCORES": exp / exp.sum(axis=1, keepdims=True)}
