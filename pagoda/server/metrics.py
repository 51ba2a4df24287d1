"""Prometheus metrics of the server (prometheus_client, one registry per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)


class _EngineCollector:
    """Gauges read from the engine's statistics at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        s = e.stats
        used = e.pool.usable - e.pool.num_free
        for name, doc, value in (
            ("pagoda_num_requests_running", "Requests being computed", len(e.scheduler.running)),
            ("pagoda_num_requests_waiting", "Requests waiting for admission", len(e.scheduler.waiting)),
            ("pagoda_kv_cache_usage_ratio", "Fraction of KV pages in use (requests and prefix cache)",
             used / e.pool.usable),
            ("pagoda_kv_pages_used", "KV pages in use (requests and prefix cache)", used),
            ("pagoda_kv_pages_held_by_requests", "KV pages referenced by running requests",
             int(sum(len(r.pages) for r in list(e.scheduler.running)))),
            ("pagoda_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up",
             s.prefix_hit_rate),
            ("pagoda_num_preemptions", "Requests preempted so far", s.preemptions),
            ("pagoda_cuda_graph_steps", "Engine steps replayed from a CUDA graph", s.cuda_graph_steps),
            ("pagoda_cascade_steps", "Decode steps that ran cascade attention over shared prefix pages",
             s.cascade_steps),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        if e.lora is not None:  # (vLLM's lora_requests_info: the adapters of running and waiting requests by name)
            def names(reqs):
                return ",".join(sorted({r.lora_request.lora_name for r in reqs if r.lora_request is not None}))
            g = GaugeMetricFamily("pagoda_lora_requests_info", "LoRA adapters of the running and waiting requests",
                                  labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            g.add_metric([names(list(e.scheduler.running)), names(list(e.scheduler.waiting)), str(e.lora.max_loras)],
                         1.0)
            yield g
            g = GaugeMetricFamily("pagoda_lora_slot_loads", "LoRA adapters written into device slots so far")
            g.add_metric([], float(e.lora.loads))
            yield g


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pagoda_requests", "HTTP requests by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("pagoda_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pagoda_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("pagoda_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("pagoda_inter_token_latency_seconds", "Mean time between tokens of a request",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("pagoda_e2e_request_latency_seconds", "Request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        r.register(_EngineCollector(engine))

    def render(self):
        return generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"
