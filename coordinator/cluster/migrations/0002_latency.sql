-- What each replica measures: its latency to every peer (the matrix) and to the pub/sub.
-- peer_latencies: {"<peer id>": {"relay_url": text, "http_ms": float|null, "derp_ms": float|null,
--                               "p99_ms": float|null, "error": text|null}}
ALTER TABLE replicas ADD COLUMN peer_latencies jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE replicas ADD COLUMN pubsub_latency integer NOT NULL DEFAULT 0;  -- microseconds, round trip
