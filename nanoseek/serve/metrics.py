"""The server's Prometheus metrics, written in the text exposition format (version 0.0.4) at
GET /metrics:

    nanoseek_requests_total{endpoint, method, status}   HTTP requests answered (unknown paths: "other")
    nanoseek_prompt_tokens_total{model}                 prompt tokens of finished generations
    nanoseek_generation_tokens_total{model}             tokens generated
    nanoseek_prefix_cache_hits_total{model}             generations whose prompt reused cached prefix tokens
    nanoseek_prefix_cache_hit_tokens_total{model}       prompt tokens copied from the prefix cache, not prefilled
    nanoseek_time_to_first_token_seconds{model}         histogram: request arrival to first token
    nanoseek_queue_depth                                generation requests waiting for their first token
    nanoseek_active_requests                            generation requests in flight
    nanoseek_cancelled_requests_total                   requests whose client went away
    nanoseek_speculative_drafted_tokens_total{model}    MTP drafts verified (`serve --speculative`, loaded models)
    nanoseek_speculative_accepted_tokens_total{model}   of them, drafts the main model accepted
    nanoseek_speculative_acceptance_rate{model}         accepted / drafted
    nanoseek_speculative_tokens_per_step{model}         tokens per request per main-model step

Counting is a dict update under a lock; no client library is needed.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from starlette.responses import Response

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


class Histogram:
    """Cumulative buckets, sum and count per label value."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts: dict[tuple, list[int]] = defaultdict(lambda: [0] * (len(buckets) + 1))
        self.sums: dict[tuple, float] = defaultdict(float)

    def observe(self, key: tuple, value: float) -> None:
        counts = self.counts[key]
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
        counts[-1] += 1  # +Inf
        self.sums[key] += value


class Metrics:
    """What /metrics reports; `active` and `cancelled` are read from the request counters."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)  # (endpoint, method, status)
        self.prompt_tokens: dict[tuple, int] = defaultdict(int)  # (model,)
        self.generation_tokens: dict[tuple, int] = defaultdict(int)
        self.prefix_hits: dict[tuple, int] = defaultdict(int)
        self.prefix_hit_tokens: dict[tuple, int] = defaultdict(int)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.queued = 0

    def request(self, endpoint: str, method: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, method, str(status))] += 1

    def tokens(self, model: str, prompt: int, generated: int, cached: list[int] = ()) -> None:
        """`cached`: per finished generation, its prompt tokens reused from the prefix cache."""
        with self._lock:
            self.prompt_tokens[(model,)] += prompt
            self.generation_tokens[(model,)] += generated
            self.prefix_hits[(model,)] += sum(1 for c in cached if c)
            self.prefix_hit_tokens[(model,)] += sum(cached)

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self.ttft.observe((model,), seconds)

    def queue(self, delta: int) -> None:
        with self._lock:
            self.queued += delta

    def render(self, active: int, cancelled: int, speculative: dict | None = None) -> str:
        """`speculative`: model name -> its engine's SpeculativeStats (speculative engines only)."""
        out: list[str] = []

        def family(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        with self._lock:
            family("nanoseek_requests_total", "counter", "HTTP requests answered, by endpoint, method and status.",
                   [f"nanoseek_requests_total{_labels(('endpoint', 'method', 'status'), k)} {v}"
                    for k, v in sorted(self.requests.items())])
            family("nanoseek_prompt_tokens_total", "counter", "Prompt tokens of finished generation requests.",
                   [f"nanoseek_prompt_tokens_total{_labels(('model',), k)} {v}"
                    for k, v in sorted(self.prompt_tokens.items())])
            family("nanoseek_generation_tokens_total", "counter", "Tokens generated.",
                   [f"nanoseek_generation_tokens_total{_labels(('model',), k)} {v}"
                    for k, v in sorted(self.generation_tokens.items())])
            family("nanoseek_prefix_cache_hits_total", "counter",
                   "Generations whose prompt reused cached prefix tokens.",
                   [f"nanoseek_prefix_cache_hits_total{_labels(('model',), k)} {v}"
                    for k, v in sorted(self.prefix_hits.items())])
            family("nanoseek_prefix_cache_hit_tokens_total", "counter",
                   "Prompt tokens copied from the prefix cache instead of prefilled.",
                   [f"nanoseek_prefix_cache_hit_tokens_total{_labels(('model',), k)} {v}"
                    for k, v in sorted(self.prefix_hit_tokens.items())])
            samples = []
            for k, counts in sorted(self.ttft.counts.items()):
                for b, c in zip(self.ttft.buckets + (float("inf"),), counts):
                    le = "+Inf" if b == float("inf") else repr(b)
                    samples.append(f"nanoseek_time_to_first_token_seconds_bucket"
                                   f"{_labels(('model', 'le'), k + (le,))} {c}")
                samples.append(f"nanoseek_time_to_first_token_seconds_sum{_labels(('model',), k)} {self.ttft.sums[k]}")
                samples.append(f"nanoseek_time_to_first_token_seconds_count{_labels(('model',), k)} {counts[-1]}")
            family("nanoseek_time_to_first_token_seconds", "histogram",
                   "Seconds from a generation request's arrival to its first token.", samples)
            family("nanoseek_queue_depth", "gauge", "Generation requests waiting for their first token.",
                   [f"nanoseek_queue_depth {self.queued}"])
        family("nanoseek_active_requests", "gauge", "Generation requests in flight.",
               [f"nanoseek_active_requests {active}"])
        family("nanoseek_cancelled_requests_total", "counter", "Requests whose client went away before the end.",
               [f"nanoseek_cancelled_requests_total {cancelled}"])
        if speculative:
            stats = sorted(speculative.items())
            for name, kind, help_, value in (
                    ("nanoseek_speculative_drafted_tokens_total", "counter", "MTP drafts verified by the main model.",
                     lambda s: s.drafted),
                    ("nanoseek_speculative_accepted_tokens_total", "counter", "MTP drafts the main model accepted.",
                     lambda s: s.accepted),
                    ("nanoseek_speculative_acceptance_rate", "gauge", "Accepted MTP drafts over drafts.",
                     lambda s: s.acceptance_rate),
                    ("nanoseek_speculative_tokens_per_step", "gauge", "Tokens per request per main-model step.",
                     lambda s: s.tokens_per_step)):
                family(name, kind, help_, [f"{name}{_labels(('model',), (m,))} {value(s)}" for m, s in stats])
        return "\n".join(out) + "\n"

    def response(self, active: int, cancelled: int, speculative: dict | None = None) -> Response:
        return Response(self.render(active, cancelled, speculative).encode("utf-8"), media_type=CONTENT_TYPE)
