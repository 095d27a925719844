//! Faults injected in the real database, for tests of what Baton does when PostgreSQL refuses
//! a write: no mock of Baton's own code.

use sqlx::PgPool;

/// Makes the database refuse the next `times` updates that would record a job as succeeded
/// (a trigger raising an error). The count is kept in a sequence, which the rolled-back
/// transaction of a refused write does not undo; `SELECT last_value FROM refusals` tells how
/// many were attempted.
pub async fn refuse_successes(pool: &PgPool, times: i64) {
    for sql in [
        "CREATE SEQUENCE refusals".to_owned(),
        format!(
            "CREATE FUNCTION refuse_success() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('refusals') <= {times} THEN
                     RAISE EXCEPTION 'injected: the database refuses this completion';
                 END IF;
                 RETURN NEW;
             END $$"
        ),
        "CREATE TRIGGER refuse_success BEFORE UPDATE ON jobs FOR EACH ROW
         WHEN (NEW.status = 'succeeded') EXECUTE FUNCTION refuse_success()"
            .to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .expect("set up the refusal");
    }
}
