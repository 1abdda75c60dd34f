-- Replica registry and site-wide settings.
-- Every timestamp comes from the database clock (now()); replicas' own clocks may be skewed.

CREATE TABLE replicas (
    id               uuid        PRIMARY KEY,  -- Coder has no key here; duplicates helped nobody
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),  -- the heartbeat
    stopped_at       timestamptz,                          -- set by a graceful stop
    hostname         text        NOT NULL,
    region_id        integer     NOT NULL,
    relay_url        text        NOT NULL DEFAULT '',      -- direct URL peers mesh to, never the load balancer
    version          text        NOT NULL DEFAULT '',
    database_latency integer     NOT NULL DEFAULT 0,       -- microseconds
    error            text        NOT NULL DEFAULT '',      -- '' = healthy, else e.g. 'Failed to dial peers: ...'
    -- Each replica declares its own interval so peers judge it by its promise, not theirs:
    -- a rolling change of the heartbeat setting must not make replicas look dead to each other.
    heartbeat_ms     integer     NOT NULL CHECK (heartbeat_ms > 0)
);

CREATE TABLE site_config (
    key        text        PRIMARY KEY,
    value      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
