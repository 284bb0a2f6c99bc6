"""meshserve's own protobuf descriptor pool: the generated modules register their files here, not in the default pool.

Triton's client registers the same ``inference.*`` messages in the default pool under other file names;
protobuf refuses a symbol defined twice in one pool, so a process that imports both would fail at import.
With a pool of its own, meshserve and ``tritonclient`` load side by side in one process (the wire format
and the gRPC method paths are unchanged). protos/generate.py rewrites the generated code to use it.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
