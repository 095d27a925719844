//! Times the pieces a test binary pays for: a ready throwaway cluster, a template, a clone.
//!
//! `cargo run -p baton-devdb --example devdb_timing` (delete
//! `$TMPDIR/baton-devdb-initdb-*` first to include the one-time initdb).

use std::time::Instant;

use baton_devdb::Cluster;
use sqlx::{Connection, PgConnection};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let cluster = Cluster::throwaway().await?;
    println!("throwaway cluster ready: {:?}", t.elapsed());

    let t = Instant::now();
    cluster
        .create_template("baton_template", |url| async move {
            let mut conn = PgConnection::connect(&url).await?;
            sqlx::raw_sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            Ok::<_, sqlx::Error>(())
        })
        .await?;
    println!("template (create + 1 table + seal): {:?}", t.elapsed());

    for i in 0..5 {
        let t = Instant::now();
        cluster
            .create_database(&format!("clone_{i}"), Some("baton_template"))
            .await?;
        println!("clone {i}: {:?}", t.elapsed());
    }

    let t = Instant::now();
    cluster.stop()?;
    println!("stop: {:?}", t.elapsed());
    let t = Instant::now();
    drop(cluster);
    println!("drop (delete dir): {:?}", t.elapsed());
    Ok(())
}
