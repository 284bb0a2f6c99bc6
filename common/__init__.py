"""What several meshserve components share, and nothing else: one definition of each convention.

The error taxonomy and the one status interceptor (``errors``,
``status_interceptor``), the tensor codec (``tensors``), sizes, backoff with
jitter, leader hints (``leader``), listeners (``listen``), server limits,
telemetry set-up, systemd notification (``sd_notify``), security (TLS,
identities, roles, tokens, the auth interceptor), the environment variables
an assignment carries (``assignment_env``), replica and node states
(``states``), the runtime's ready line (``ready_line``), and reading and checking a
model's ``config.pbtxt`` and files (``model_config``, ``model_check``: the runtime loads with them, the
scheduler and ``scheduler ctl`` check before anything runs).

The daemons (runtime, scheduler, node agent, proxy) may import this package
and ``meshserve.protos``; this package imports neither a daemon nor the
client library (tests/test_import_boundaries.py).
"""
