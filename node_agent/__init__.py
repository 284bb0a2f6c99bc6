"""meshserve's node agent: one per host.

Registers the host with the scheduler, streams usage reports (GPUs from NVML,
a fake only when asked, or none), and keeps the replica processes it is
assigned running. Modules, one concern each:

- ``gpu_probe``: the GPU seam (NVML | fake | none) and ``select_probe``.
- ``host``: CPU cores and memory of the host.
- ``process``: the process-launcher and clock seams.
- ``backoff``: the retry schedule.
- ``replica``: one replica's spec, status and supervision loop.
- ``supervisor``: reconciles the set of replicas against assignments.
- ``messages``: protobuf <-> domain conversion.
- ``membership``: the cluster this node joined, remembered on disk.
- ``agent``: the scheduler connection (register, report, assignments, failover).
- ``__main__``: the ``node-agent`` command.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("meshserve")
except _metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+checkout"
