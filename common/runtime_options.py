"""The runtime's command-line options that other components pass to it: one definition for both sides.

A node agent builds a replica's ``python -m meshserve.runtime`` command line
and checks an assignment's extra flags against its host policy
(node_agent/runtime_flags.py); the runtime parses the same flags
(runtime/__main__.py).
"""

# ``--model-control``: Triton's ``--model-control-mode``. "none" (the default): the models are those
# loaded at start, RepositoryModelLoad/Unload are refused; "explicit": both are allowed
# (runtime/model_control.py). A mesh replica gets "explicit" only where its host policy allows it.
MODEL_CONTROL_FLAG = "--model-control"
MODEL_CONTROL_NONE, MODEL_CONTROL_EXPLICIT = "none", "explicit"
MODEL_CONTROL_MODES = (MODEL_CONTROL_NONE, MODEL_CONTROL_EXPLICIT)

# ``--shared-memory``: "system" serves Triton's system shared memory extension (the default of a
# standalone runtime, as in Triton); "none" refuses every registration. A node agent passes what
# its host policy says (node_agent/policy.py ``shared_memory``, default none).
SHARED_MEMORY_FLAG = "--shared-memory"
SHARED_MEMORY_NONE, SHARED_MEMORY_SYSTEM = "none", "system"
SHARED_MEMORY_MODES = (SHARED_MEMORY_NONE, SHARED_MEMORY_SYSTEM)
