"""fragile_step: OUT = IN; raises on a negative value, failing its own request."""


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        x = inputs["IN"]
        if (x < 0).any():
            raise ValueError(f"fragile_step refuses negative input {float(x[x < 0][0])}")
        return {"OUT": x}
