"""broken: fails to load (its step in bad_broken_step names it)."""


class Predictor:
    def __init__(self, config):
        raise RuntimeError("broken cannot load")

    def predict(self, inputs):
        return {}
