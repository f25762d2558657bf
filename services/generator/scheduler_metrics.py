"""The scheduler's Prometheus metrics (docs/architecture.md, "Metrics"): the request queue's
gauges, token counts, latencies and how sequences go solo. They move on the MLX thread, from
host-side state only (services/generator/scheduler.py)."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

WAITING = Gauge("extmind_generator_waiting_requests", "admitted requests that have no token yet (queued or prefilling)")
RUNNING = Gauge("extmind_generator_running_requests", "requests producing tokens: the running decode batch size")
PROMPT_TOKENS = Counter("extmind_generator_prompt_tokens", "prompt tokens of admitted requests")
GENERATED_TOKENS = Counter("extmind_generator_generated_tokens", "tokens generated (EOS included)")
TIME_TO_FIRST_TOKEN = Histogram(
    "extmind_generator_time_to_first_token_seconds",
    "seconds from a request's arrival at the engine (memory resolution included) to its first token",
    buckets=LATENCY_BUCKETS,
)
SOLO = Counter(
    "extmind_generator_solo_sequences",
    "sequences decoded solo on mlx-lm's generate_step (docs/architecture.md, 'One stream decodes solo'), "
    "by how they got there: from_prompt (alone in their group on arrival), handed_over (out of the "
    "batch after decoding alone), or back to the batch (resumed: another request joined)",
    ["how"],
)
REQUEST_SECONDS = Histogram(
    "extmind_generator_request_seconds",
    "seconds from a request's arrival at the engine to its end, by how it ended "
    "(stop, length, stop_sequence, error, cancelled)",
    ["finish_reason"],
    buckets=LATENCY_BUCKETS,
)
