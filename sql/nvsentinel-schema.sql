-- NVSentinel PostgreSQL datastore schema as migrations 00001-00003 leave it,
-- written for an EMPTY database and applied in one go (test fixture only).
--
-- Source of the facts: shared/reference/nvsentinel-datastore.md section 1.
-- Differences from the real migration files, on purpose:
--   * no adoption checks for pre-existing tables (the database is empty);
--   * triggers use CREATE OR REPLACE TRIGGER (PostgreSQL >= 14) instead of a
--     pg_trigger existence check;
--   * the 00003 unique index is a plain CREATE UNIQUE INDEX (not CONCURRENTLY),
--     so the whole file can run inside one transaction / one batch_execute.
-- Must apply with `psql -v ON_ERROR_STOP=1 -f` and with tokio-postgres batch_execute.

CREATE EXTENSION IF NOT EXISTS "uuid-ossp";

-- ---------------------------------------------------------------------------
-- Migration bookkeeping (read by applications: RequiredSchemaVersion = 3)
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS nvsentinel_schema_migrations (
    version     BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- ---------------------------------------------------------------------------
-- health_events: the exporter's source table (00001 + 00002 columns)
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS health_events (
    id                          UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    node_name                   VARCHAR(255) NOT NULL,
    event_type                  VARCHAR(100),
    severity                    VARCHAR(50),
    recommended_action          VARCHAR(100),
    node_quarantined            VARCHAR(50),
    user_pods_eviction_status   VARCHAR(50) DEFAULT 'NotStarted',
    user_pods_eviction_message  TEXT,
    fault_remediated            BOOLEAN,
    last_remediation_timestamp  TIMESTAMPTZ,
    document                    JSONB NOT NULL,
    created_at                  TIMESTAMPTZ DEFAULT NOW(),
    updated_at                  TIMESTAMPTZ DEFAULT NOW(),
    quarantine_finish_timestamp TIMESTAMPTZ,
    drain_finish_timestamp      TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_health_events_node_name
    ON health_events (node_name);
CREATE INDEX IF NOT EXISTS idx_health_events_node_type
    ON health_events (node_name, event_type);
CREATE INDEX IF NOT EXISTS idx_health_events_quarantined
    ON health_events (node_quarantined)
    WHERE node_quarantined IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_health_events_eviction_status
    ON health_events (user_pods_eviction_status);
CREATE INDEX IF NOT EXISTS idx_health_events_created_desc
    ON health_events (created_at DESC);
CREATE INDEX IF NOT EXISTS idx_health_events_created_id
    ON health_events (created_at, id);
-- Documents may carry lowercase (Mongo-style) or camelCase (PG path) keys.
CREATE INDEX IF NOT EXISTS idx_health_events_recovery_identity
    ON health_events (
        (document -> 'healthevent' ->> 'agent'),
        (COALESCE(document -> 'healthevent' ->> 'componentclass',
                  document -> 'healthevent' ->> 'componentClass')),
        (COALESCE(document -> 'healthevent' ->> 'checkname',
                  document -> 'healthevent' ->> 'checkName')),
        (COALESCE(document -> 'healthevent' ->> 'nodename',
                  document -> 'healthevent' ->> 'nodeName')),
        (document -> 'healthevent' ->> 'version'),
        created_at,
        id
    );
CREATE INDEX IF NOT EXISTS idx_health_events_fault_quarantine_pending
    ON health_events (created_at, id)
    WHERE (
        COALESCE(document -> 'healtheventstatus' ->> 'nodequarantined',
                 document -> 'healtheventstatus' ->> 'nodeQuarantined') IS NULL
        OR COALESCE(document -> 'healtheventstatus' ->> 'nodequarantined',
                    document -> 'healtheventstatus' ->> 'nodeQuarantined') = ''
        OR COALESCE(document -> 'healtheventstatus' ->> 'nodequarantined',
                    document -> 'healtheventstatus' ->> 'nodeQuarantined') = 'NotStarted'
    )
    AND (
        document -> 'healtheventstatus' ->> 'faultquarantinerecovery' IS NULL
        OR document -> 'healtheventstatus' ->> 'faultquarantinerecovery' = ''
    );
CREATE INDEX IF NOT EXISTS idx_health_events_updated_desc
    ON health_events (updated_at DESC);
CREATE INDEX IF NOT EXISTS idx_health_events_document_gin
    ON health_events USING GIN (document);

-- ---------------------------------------------------------------------------
-- maintenance_events: CSP maintenance (also feeds the changelog)
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS maintenance_events (
    id                       UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    event_id                 VARCHAR(255) UNIQUE NOT NULL,
    csp                      VARCHAR(50) NOT NULL,
    cluster_name             VARCHAR(255) NOT NULL,
    node_name                VARCHAR(255),
    status                   VARCHAR(50) NOT NULL,
    csp_status               VARCHAR(50),
    scheduled_start_time     TIMESTAMPTZ,
    actual_end_time          TIMESTAMPTZ,
    event_received_timestamp TIMESTAMPTZ NOT NULL,
    last_updated_timestamp   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    document                 JSONB NOT NULL,
    created_at               TIMESTAMPTZ DEFAULT NOW(),
    updated_at               TIMESTAMPTZ DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_maintenance_events_event_id
    ON maintenance_events (event_id);
CREATE INDEX IF NOT EXISTS idx_maintenance_events_csp_cluster
    ON maintenance_events (csp, cluster_name);
CREATE INDEX IF NOT EXISTS idx_maintenance_events_node_status
    ON maintenance_events (node_name, status);
CREATE INDEX IF NOT EXISTS idx_maintenance_events_status_scheduled
    ON maintenance_events (status, scheduled_start_time)
    WHERE scheduled_start_time IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_maintenance_events_status_actual_end
    ON maintenance_events (status, actual_end_time)
    WHERE actual_end_time IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_maintenance_events_received_desc
    ON maintenance_events (csp, cluster_name, event_received_timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_maintenance_events_last_updated
    ON maintenance_events (last_updated_timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_maintenance_events_csp_status
    ON maintenance_events (csp_status)
    WHERE csp_status IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_maintenance_events_document_gin
    ON maintenance_events USING GIN (document);

-- ---------------------------------------------------------------------------
-- datastore_changelog: the change feed written by the row triggers
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS datastore_changelog (
    id         BIGSERIAL PRIMARY KEY,
    table_name VARCHAR(100) NOT NULL,
    record_id  UUID NOT NULL,
    operation  VARCHAR(20) NOT NULL,
    old_values JSONB,
    new_values JSONB,
    changed_at TIMESTAMPTZ DEFAULT NOW(),
    processed  BOOLEAN DEFAULT FALSE
);

CREATE INDEX IF NOT EXISTS idx_changelog_unprocessed
    ON datastore_changelog (changed_at)
    WHERE processed = FALSE;
CREATE INDEX IF NOT EXISTS idx_changelog_table_record
    ON datastore_changelog (table_name, record_id);
-- Added by 00002.
CREATE INDEX IF NOT EXISTS idx_changelog_resume
    ON datastore_changelog (table_name, changed_at, id)
    WHERE processed = FALSE;

-- ---------------------------------------------------------------------------
-- resume_tokens: one bookmark row per client (the exporter uses 'event-exporter')
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS resume_tokens (
    client_name  VARCHAR(255) PRIMARY KEY,
    resume_token JSONB NOT NULL,
    last_updated TIMESTAMPTZ DEFAULT NOW()
);

-- ---------------------------------------------------------------------------
-- Change trigger function in its 00002 form: changelog row + NOTIFY.
-- NOTIFY is delivered at commit; payload {"id", "table", "operation"}.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION log_table_changes() RETURNS TRIGGER AS $$
DECLARE
    changelog_id BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO datastore_changelog (table_name, record_id, operation, old_values)
        VALUES (TG_TABLE_NAME, OLD.id, TG_OP, to_jsonb(OLD))
        RETURNING id INTO changelog_id;
        PERFORM pg_notify('nvsentinel_changes',
            json_build_object('id', changelog_id, 'table', TG_TABLE_NAME, 'operation', TG_OP)::text);
        RETURN OLD;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO datastore_changelog (table_name, record_id, operation, old_values, new_values)
        VALUES (TG_TABLE_NAME, NEW.id, TG_OP, to_jsonb(OLD), to_jsonb(NEW))
        RETURNING id INTO changelog_id;
        PERFORM pg_notify('nvsentinel_changes',
            json_build_object('id', changelog_id, 'table', TG_TABLE_NAME, 'operation', TG_OP)::text);
        RETURN NEW;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO datastore_changelog (table_name, record_id, operation, new_values)
        VALUES (TG_TABLE_NAME, NEW.id, TG_OP, to_jsonb(NEW))
        RETURNING id INTO changelog_id;
        PERFORM pg_notify('nvsentinel_changes',
            json_build_object('id', changelog_id, 'table', TG_TABLE_NAME, 'operation', TG_OP)::text);
        RETURN NEW;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER maintenance_events_changes
    AFTER INSERT OR UPDATE OR DELETE ON maintenance_events
    FOR EACH ROW EXECUTE FUNCTION log_table_changes();

CREATE OR REPLACE TRIGGER health_events_changes
    AFTER INSERT OR UPDATE OR DELETE ON health_events
    FOR EACH ROW EXECUTE FUNCTION log_table_changes();

-- Deletes processed changelog rows older than the retention window.
CREATE OR REPLACE FUNCTION cleanup_changelog(retention_days INTEGER DEFAULT 7)
RETURNS INTEGER AS $$
DECLARE
    deleted_count INTEGER;
BEGIN
    DELETE FROM datastore_changelog
    WHERE changed_at < NOW() - (retention_days || ' days')::INTERVAL
      AND processed = TRUE;
    GET DIAGNOSTICS deleted_count = ROW_COUNT;
    RETURN deleted_count;
END;
$$ LANGUAGE plpgsql;

-- Marks every changelog row (all tables) up to max_id as processed.
CREATE OR REPLACE FUNCTION mark_changelog_processed(max_id BIGINT)
RETURNS INTEGER AS $$
DECLARE
    updated_count INTEGER;
BEGIN
    UPDATE datastore_changelog
    SET processed = TRUE
    WHERE id <= max_id AND processed = FALSE;
    GET DIAGNOSTICS updated_count = ROW_COUNT;
    RETURN updated_count;
END;
$$ LANGUAGE plpgsql;

-- ---------------------------------------------------------------------------
-- 00003: idempotency key written by the platform connector (ADR 052)
-- ---------------------------------------------------------------------------
CREATE UNIQUE INDEX IF NOT EXISTS healthevent_idempotency_key_unique
    ON health_events ((document #>> '{healthevent,metadata,idempotencyKey}'))
    WHERE (document #>> '{healthevent,metadata,idempotencyKey}') IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Versions 1-3 recorded as applied.
-- ---------------------------------------------------------------------------
INSERT INTO nvsentinel_schema_migrations (version, description) VALUES
    (1, 'initial PostgreSQL schema'),
    (2, 'reconcile historical Go runtime DDL'),
    (3, 'health event idempotency index')
ON CONFLICT (version) DO NOTHING;
