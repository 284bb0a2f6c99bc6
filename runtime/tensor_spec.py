"""What a model declares about one tensor, and checking a request's tensor against it."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common.errors import InvalidArgument
from meshserve.common.tensors import CONFIG_TO_DATATYPE
from meshserve.protos.inference import model_config_pb2 as mc


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output. ``dims`` excludes the batch axis; -1 is any size."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False

    @classmethod
    def from_config(cls, tensor) -> TensorSpec:
        return cls(
            name=tensor.name,
            datatype=CONFIG_TO_DATATYPE[mc.DataType.Name(tensor.data_type)],
            dims=tuple(tensor.dims),
            optional=getattr(tensor, "optional", False),
        )

    def wire_shape(self, max_batch_size: int) -> list[int]:
        """The shape clients see in metadata: a leading -1 batch axis when batching."""
        return [-1, *self.dims] if max_batch_size > 0 else list(self.dims)

    def check_shape(self, model: str, shape: list[int], max_batch_size: int) -> None:
        """Raise InvalidArgument unless ``shape`` (with batch axis if batching) matches."""
        item_shape = shape[1:] if max_batch_size > 0 else shape
        if max_batch_size > 0:
            if not shape:
                raise InvalidArgument(
                    f"input '{self.name}' of model '{model}' needs a batch dimension; "
                    f"expected shape {self.wire_shape(max_batch_size)}"
                )
            if not 1 <= shape[0] <= max_batch_size:
                raise InvalidArgument(
                    f"input '{self.name}' has batch size {shape[0]}, outside 1..{max_batch_size} "
                    f"(max_batch_size of model '{model}')"
                )
        if len(item_shape) != len(self.dims) or any(
            want != -1 and want != got for want, got in zip(self.dims, item_shape, strict=True)
        ):
            raise InvalidArgument(
                f"input '{self.name}' has shape {list(shape)} but model '{model}' expects "
                f"{self.wire_shape(max_batch_size)}"
            )
