"""One trace through the whole data path: client span -> proxy span -> runtime span -> queue, execute."""

from __future__ import annotations

from mesh_harness import Process
from otlp_receiver import OtlpReceiver
from test_tracing import EXAMPLES, SPAN_TIMEOUT_S, _by_request, _children, _one, run_client_app, tracing_env

PROXY_SERVICE = "meshserve-proxy"


def test_a_call_through_the_proxy_is_one_trace_across_three_services(start_runtime, tmp_path):
    with OtlpReceiver() as receiver:
        runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", env=tracing_env(receiver))
        routes = tmp_path / "routes.pbtxt"
        routes.write_text('routes { model: "add_sub" weight: 1 '
                          f'endpoints {{ replica_id: "add-sub-1" address: "{runtime.address}" node: "node-a" }} }}\n')
        proxy = Process("proxy", ["-m", "meshserve.proxy", "--routes-file", str(routes), "--listen", "127.0.0.1:0"],
                        env=tracing_env(receiver))
        try:
            app = run_client_app(proxy.wait_listening(), receiver, all_calls=False)

            def complete(spans):
                return any(s.name == "execute" for s in spans) and any(
                    s.service_name == PROXY_SERVICE for s in spans)
            spans = receiver.wait_for(complete, SPAN_TIMEOUT_S)
        finally:
            proxy.stop()
    assert {s.trace_id for s in spans} == {app["trace_id"]}
    client = _by_request(spans, "CLIENT", "req-1")
    proxy_span = _one(spans, parent_span_id=client.span_id)
    assert (proxy_span.kind, proxy_span.service_name) == ("SERVER", PROXY_SERVICE)
    assert proxy_span.attributes["meshserve.model"] == "add_sub"
    assert proxy_span.attributes["meshserve.replica"] == "add-sub-1"
    runtime_span = _one(spans, parent_span_id=proxy_span.span_id)
    assert (runtime_span.name, runtime_span.kind) == ("ModelInfer add_sub", "SERVER")
    assert set(_children(spans, runtime_span)) == {"queue", "execute"}
