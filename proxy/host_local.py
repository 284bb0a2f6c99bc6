"""What the proxy refuses because it belongs to one host: shared memory and model control.

- A shared memory region is a file on the host of the runtime that
  registered it; through the proxy a request would reach a replica on
  another host, or name a region some other client registered there. So the
  registration RPCs answer FAILED_PRECONDITION, and an inference request
  whose input or output names a region (``shared_memory_region``) answers
  INVALID_ARGUMENT naming the tensor. It is never forwarded.
- Which models replicas serve is the scheduler's decision (``scheduler ctl
  apply``): ``RepositoryModelLoad``/``Unload`` answer FAILED_PRECONDITION.

The hot path stays cheap: ``proxy.wire.scan_request`` only searches the
(small) tensor descriptions for the parameter key; ``refuse_shared_memory``
parses the request only when the key is there.
"""

from __future__ import annotations

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.protos.inference import grpc_service_pb2 as pb

REGION_PARAMETER = "shared_memory_region"   # runtime.shared_memory.REGION_PARAMETER (KServe v2 / Triton)


def shared_memory_refused(what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{what} is refused by the proxy: shared memory regions are local to a host; register them "
        f"with a runtime on the same host and send requests that name them to that runtime")


def model_control_refused(what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{what} is refused by the proxy: the scheduler decides which models replicas serve "
        f"(scheduler ctl apply / scale / delete)")


def refuse_shared_memory(request: pb.ModelInferRequest) -> None:
    """InvalidArgument if an input or output of ``request`` names a shared memory region."""
    for kind, tensors in (("input", request.inputs), ("output", request.outputs)):
        for tensor in tensors:
            if REGION_PARAMETER in tensor.parameters:
                raise InvalidArgument(
                    f"{kind} '{tensor.name}' names shared memory region "
                    f"'{tensor.parameters[REGION_PARAMETER].string_param}': shared memory is local to a "
                    f"host and refused through the proxy; send the tensor's bytes, or call a runtime on "
                    f"the same host")
