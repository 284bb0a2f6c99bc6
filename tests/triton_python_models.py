"""Triton Python-backend models, written out into a model repository for the tests; no tests here.

``add_sub``, ``repeat_int32`` and ``string`` follow Triton's published
examples (python_backend examples/add_sub and examples/decoupled/repeat_*,
and the server's qa/python_models/string): the same config, the same
``triton_python_backend_utils`` calls and behaviour, restated here without
their long comments. ``run_published_examples`` in the test module serves
the published files themselves when a python_backend checkout is given.
The other models probe what meshserve hands a model and how failures travel.
"""

from __future__ import annotations

import pathlib
import textwrap

ADD_SUB_CONFIG = """
name: "add_sub"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
input [ { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [{ kind: KIND_CPU }]
"""

ADD_SUB_MODEL = '''
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        output0_dtype = self.output0_dtype
        output1_dtype = self.output1_dtype
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0, out_1 = (in_0.as_numpy() + in_1.as_numpy(), in_0.as_numpy() - in_1.as_numpy())
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(output1_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_tensor_0, out_tensor_1]))
        return responses

    def finalize(self):
        print("Cleaning up...")
'''

REPEAT_CONFIG = """
name: "repeat_int32"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: True }
input [
  { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "DELAY" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "WAIT" data_type: TYPE_UINT32 dims: [ 1 ] }
]
output [
  { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }
]
instance_group [{ kind: KIND_CPU }]
"""

REPEAT_MODEL = '''
import json
import threading
import time

import numpy

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException(
                "the model `{}` can generate any number of responses per request, enable decoupled "
                "transaction policy in model configuration to serve this model".format(args["model_name"]))
        out_config = pb_utils.get_output_config_by_name(model_config, "OUT")
        idx_config = pb_utils.get_output_config_by_name(model_config, "IDX")
        self.out_dtype = pb_utils.triton_string_to_numpy(out_config["data_type"])
        self.idx_dtype = pb_utils.triton_string_to_numpy(idx_config["data_type"])
        parameters = self.model_config.get("parameters", {})
        self.output_num_elements = int(parameters.get("output_num_elements", {}).get("string_value", 1))
        self.inflight_thread_count = 0
        self.inflight_thread_count_lck = threading.Lock()

    def execute(self, requests):
        if len(requests) != 1:
            raise pb_utils.TritonModelException("unsupported batch size " + len(requests))
        in_input = pb_utils.get_input_tensor_by_name(requests[0], "IN").as_numpy()
        delay_input = pb_utils.get_input_tensor_by_name(requests[0], "DELAY").as_numpy()
        if in_input.shape != delay_input.shape:
            raise pb_utils.TritonModelException(
                f"expected IN and DELAY shape to match, got {list(in_input.shape)} and {list(delay_input.shape)}.")
        thread = threading.Thread(target=self.response_thread,
                                  args=(requests[0].get_response_sender(), in_input, delay_input))
        thread.daemon = True
        with self.inflight_thread_count_lck:
            self.inflight_thread_count += 1
        thread.start()
        wait_input = pb_utils.get_input_tensor_by_name(requests[0], "WAIT").as_numpy()
        time.sleep(wait_input[0] / 1000)
        return None

    def response_thread(self, response_sender, in_input, delay_input):
        idx_dtype = self.idx_dtype
        out_dtype = self.out_dtype
        for idx in range(in_input.size):
            in_value = in_input[idx]
            delay_value = delay_input[idx]
            time.sleep(delay_value / 1000)
            idx_output = pb_utils.Tensor("IDX", numpy.array([idx], idx_dtype))
            out_output = pb_utils.Tensor("OUT", numpy.full((self.output_num_elements,), in_value, dtype=out_dtype))
            response_sender.send(pb_utils.InferenceResponse(output_tensors=[idx_output, out_output]))
        response_sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        with self.inflight_thread_count_lck:
            self.inflight_thread_count -= 1

    def finalize(self):
        inflight_threads = True
        while inflight_threads:
            with self.inflight_thread_count_lck:
                inflight_threads = self.inflight_thread_count != 0
            if inflight_threads:
                time.sleep(0.1)
'''

STRING_CONFIG = """
name: "string"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [{ kind: KIND_CPU }]
"""

STRING_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Answers with its input as np.bytes_, then as np.object_, then fails (its list has two dtypes)."""

    def initialize(self, args):
        self._index = 0
        self._dtypes = [np.bytes_, np.object_]

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", in_0.as_numpy().astype(self._dtypes[self._index]))
            self._index += 1
            responses.append(pb_utils.InferenceResponse([out_tensor_0]))
        return responses
'''

# Echoes what the model was given (its args and each request's view) as JSON, one response per
# request, and how many requests each execute received; batched with the dynamic batcher.
PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 100000 }
parameters { key: "greeting" value { string_value: "hello" } }
input [ { name: "X" data_type: TYPE_INT32 dims: [ 2 ] } ]
output [ { name: "SEEN" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_INT32 dims: [ 2 ] } ]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

PROBE_MODEL = '''
import json
import pathlib
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        self.calls = 0

    def execute(self, requests):
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)  # the first batch runs long, so the requests sent meanwhile queue together
        responses = []
        for request in requests:
            if json.loads(request.parameters()).get("fail"):  # fails alone; the rest of its batch answers
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("asked to fail", pb_utils.TritonError.INVALID_ARG)))
                continue
            x = pb_utils.get_input_tensor_by_name(request, "X")
            seen = {
                "args": self.args,
                "request_count": len(requests),
                "request_id": request.request_id(),
                "requested": request.requested_output_names(),
                "parameters": json.loads(request.parameters()),
                "input_names": [t.name() for t in request.inputs()],
                "is_cpu": x.is_cpu(),
                "dlpack_roundtrip": bool((pb_utils.Tensor.from_dlpack("x", x.to_dlpack()).as_numpy()
                                          == x.as_numpy()).all()),
                "type_number": pb_utils.numpy_to_triton_type(x.as_numpy().dtype.type),
                "missing_input": pb_utils.get_input_tensor_by_name(request, "NOPE") is None,
            }
            batch = x.as_numpy().shape[0]
            out = np.array([[json.dumps(seen).encode()]] * batch, dtype=np.object_)
            response = pb_utils.InferenceResponse([pb_utils.Tensor("SEEN", out), pb_utils.Tensor("Y", x.as_numpy() * 10)])
            assert pb_utils.get_output_tensor_by_name(response, "Y") is not None
            responses.append(response)
        return responses

    def finalize(self):
        marker = pathlib.Path(self.args["model_repository"]) / "finalized"
        marker.write_text(self.args["model_instance_name"])
'''

# Misbehaves on demand: MODE picks the failure (see HOSTILE_MODES).
HOSTILE_CONFIG = """
name: "hostile"
backend: "python"
input [ { name: "MODE" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

HOSTILE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        mode = int(pb_utils.get_input_tensor_by_name(requests[0], "MODE").as_numpy()[0])
        if mode == 1:
            raise pb_utils.TritonModelException("the model refuses this batch")
        if mode == 2:
            return []
        if mode == 3:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError("MODE 3 is not allowed",
                                                                          pb_utils.TritonError.INVALID_ARG))]
        if mode == 4:
            raise ValueError("plain python failure")
        if mode == 5:
            return None
        if mode == 6:
            return [pb_utils.InferenceResponse([])]  # no OUT
        if mode == 7:
            return ["not a response"]
        if mode == 10:  # not decoupled: Triton refuses the sender too
            requests[0].get_response_sender()
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([mode * 2], np.int32))])]
'''

# A decoupled model that misbehaves on demand.
HOSTILE_STREAM_CONFIG = """
name: "hostile_stream"
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "MODE" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

HOSTILE_STREAM_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        mode = int(pb_utils.get_input_tensor_by_name(requests[0], "MODE").as_numpy()[0])
        sender = requests[0].get_response_sender()
        out = pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([7], np.int32))])
        if mode == 1:  # one response, then the sender is dropped without FINAL
            sender.send(out)
            return None
        if mode == 2:
            raise pb_utils.TritonModelException("decoupled failure")
        if mode == 3:  # an error response
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("not found here",
                                                                              pb_utils.TritonError.NOT_FOUND)),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        if mode == 4:  # sending after FINAL raises in the model
            sender.send(out, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            sender.send(out)
            return None
        sender.send(out)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# No inputs or outputs in its config: auto_complete_config declares them (Triton's auto_complete example).
AUTO_CONFIG = """
name: "auto"
backend: "python"
"""

AUTO_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [3]})
        auto_complete_model_config.add_output({"name": "B", "data_type": "TYPE_FP32", "dims": [3]})
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("B", pb_utils.get_input_tensor_by_name(r, "A")
                                                            .as_numpy() * 3)]) for r in requests]
'''

MODELS = {
    "add_sub": (ADD_SUB_CONFIG, ADD_SUB_MODEL),
    "repeat_int32": (REPEAT_CONFIG, REPEAT_MODEL),
    "string": (STRING_CONFIG, STRING_MODEL),
    "probe": (PROBE_CONFIG, PROBE_MODEL),
    "hostile": (HOSTILE_CONFIG, HOSTILE_MODEL),
    "hostile_stream": (HOSTILE_STREAM_CONFIG, HOSTILE_STREAM_MODEL),
    "auto": (AUTO_CONFIG, AUTO_MODEL),
}


def write_repository(root: pathlib.Path, models: dict[str, tuple[str, str]] = MODELS) -> pathlib.Path:
    """``root/<name>/config.pbtxt`` and ``root/<name>/1/model.py`` for each model."""
    for name, (config, source) in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(textwrap.dedent(config).lstrip())
        (root / name / "1" / "model.py").write_text(textwrap.dedent(source).lstrip())
    return root
