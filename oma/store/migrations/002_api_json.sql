-- Timestamps as the API writes them (ISO 8601, UTC, milliseconds, "Z"), so list pages can be
-- rendered as JSON by PostgreSQL itself, identical to what the Python encoder produces.
CREATE FUNCTION api_ts(t timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;
