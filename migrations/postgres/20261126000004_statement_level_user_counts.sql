-- The row-level counting trigger updated one counter row once per changed
-- user: a statement that inserts many users (an application import) then
-- walks an ever longer chain of row versions. Statement-level triggers with
-- transition tables apply each statement's net change in one update.

DROP TRIGGER IF EXISTS identity_count_users ON users;
DROP FUNCTION IF EXISTS identity_count_users();

CREATE OR REPLACE FUNCTION identity_count_users_delta() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_legacy BIGINT := 0;
    d_migrated BIGINT := 0;
    d_native BIGINT := 0;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT d_legacy + count(*) FILTER (WHERE NOT clerk_native AND clerk_user_id IS NULL),
               d_migrated + count(*) FILTER (WHERE NOT clerk_native AND clerk_user_id IS NOT NULL),
               d_native + count(*) FILTER (WHERE clerk_native)
        INTO d_legacy, d_migrated, d_native
        FROM identity_new_users;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        SELECT d_legacy - count(*) FILTER (WHERE NOT clerk_native AND clerk_user_id IS NULL),
               d_migrated - count(*) FILTER (WHERE NOT clerk_native AND clerk_user_id IS NOT NULL),
               d_native - count(*) FILTER (WHERE clerk_native)
        INTO d_legacy, d_migrated, d_native
        FROM identity_old_users;
    END IF;
    -- Unrelated updates (a failed login counter, say) change nothing and lock nothing.
    IF d_legacy <> 0 OR d_migrated <> 0 OR d_native <> 0 THEN
        UPDATE identity_user_counts
        SET legacy_only = legacy_only + d_legacy, migrated = migrated + d_migrated, clerk_native = clerk_native + d_native
        WHERE id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER identity_count_users_insert
    AFTER INSERT ON users REFERENCING NEW TABLE AS identity_new_users
    FOR EACH STATEMENT EXECUTE FUNCTION identity_count_users_delta();
CREATE TRIGGER identity_count_users_update
    AFTER UPDATE ON users REFERENCING OLD TABLE AS identity_old_users NEW TABLE AS identity_new_users
    FOR EACH STATEMENT EXECUTE FUNCTION identity_count_users_delta();
CREATE TRIGGER identity_count_users_delete
    AFTER DELETE ON users REFERENCING OLD TABLE AS identity_old_users
    FOR EACH STATEMENT EXECUTE FUNCTION identity_count_users_delta();
