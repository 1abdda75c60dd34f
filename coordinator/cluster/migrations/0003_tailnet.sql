-- The peer coordinator (coordinator/cluster/tailnet; docs/coordinator.md).
-- Every timestamp comes from the database clock. Triggers NOTIFY the changes; receivers query.
-- Re-runnable (IF NOT EXISTS, OR REPLACE): a replaced database's schema is re-applied over what is left.

-- One row per running coordinator; separate from replicas so it could become its own service.
CREATE TABLE IF NOT EXISTS tailnet_coordinators (
    id           uuid        PRIMARY KEY,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- Judged by its own promise, as replicas are: dead after 3 missed beats of this interval.
    heartbeat_ms integer     NOT NULL CHECK (heartbeat_ms > 0)
);

CREATE TABLE IF NOT EXISTS tailnet_peers (
    id             uuid        NOT NULL,
    coordinator_id uuid        NOT NULL REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    node           jsonb       NOT NULL,
    status         text        NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'lost')),
    PRIMARY KEY (id, coordinator_id)
);
CREATE INDEX IF NOT EXISTS tailnet_peers_coordinator ON tailnet_peers (coordinator_id);

CREATE TABLE IF NOT EXISTS tailnet_tunnels (
    coordinator_id uuid        NOT NULL REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
    src_id         uuid        NOT NULL,
    dst_id         uuid        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (coordinator_id, src_id, dst_id)
);
CREATE INDEX IF NOT EXISTS tailnet_tunnels_src ON tailnet_tunnels (src_id);
CREATE INDEX IF NOT EXISTS tailnet_tunnels_dst ON tailnet_tunnels (dst_id);

CREATE OR REPLACE FUNCTION tailnet_notify_peer_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tailnet_peer_update', OLD.id::text);
    ELSE
        PERFORM pg_notify('tailnet_peer_update', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tailnet_notify_tunnel_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tailnet_tunnel_update', OLD.src_id::text || ',' || OLD.dst_id::text);
    ELSE
        PERFORM pg_notify('tailnet_tunnel_update', NEW.src_id::text || ',' || NEW.dst_id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tailnet_notify_coordinator_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tailnet_coordinator_heartbeat', NEW.id::text);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS tailnet_notify_peer_change ON tailnet_peers;
CREATE TRIGGER tailnet_notify_peer_change AFTER INSERT OR UPDATE OR DELETE ON tailnet_peers
    FOR EACH ROW EXECUTE FUNCTION tailnet_notify_peer_change();
DROP TRIGGER IF EXISTS tailnet_notify_tunnel_change ON tailnet_tunnels;
CREATE TRIGGER tailnet_notify_tunnel_change AFTER INSERT OR UPDATE OR DELETE ON tailnet_tunnels
    FOR EACH ROW EXECUTE FUNCTION tailnet_notify_tunnel_change();
DROP TRIGGER IF EXISTS tailnet_notify_coordinator_heartbeat ON tailnet_coordinators;
CREATE TRIGGER tailnet_notify_coordinator_heartbeat AFTER INSERT OR UPDATE ON tailnet_coordinators
    FOR EACH ROW EXECUTE FUNCTION tailnet_notify_coordinator_heartbeat();
