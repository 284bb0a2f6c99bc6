"""Environment variables the scheduler sets in every replica assignment: one definition for both sides.

The scheduler writes them after the spec's own ``env`` (a spec cannot
override them); the node agent reads them to account fake GPU memory and to
check a replica against its host policy's caps (node_agent/policy.py) and to
limit its process (node_agent/isolation.py).
"""

GPU_MEMORY_ENV = "MESHSERVE_GPU_MEMORY_BYTES"   # bytes booked on each of the replica's GPUs
CPU_ENV = "MESHSERVE_CPU_CORES"                 # CPU cores booked for the replica ("0.5", "2")
MEMORY_ENV = "MESHSERVE_MEMORY_BYTES"           # bytes of host memory booked (resources.memory; "0": none)
