//! The CLI against an api serving TLS: `--ca` (`BATON_CA`) makes it trust the api's
//! certificate; without it the certificate is refused with a message saying why.

use std::process::Command;

use baton_tests::pki::TestPki;

#[tokio::test]
async fn the_cli_talks_to_a_tls_api_when_given_its_ca() {
    let pki = TestPki::generate();
    let app = baton_tests::spawn_app_with(|c| {
        c.tls_cert = Some(pki.cert.clone());
        c.tls_key = Some(pki.key.clone());
    })
    .await;
    let run = |ca: Option<std::path::PathBuf>| {
        let (url, token) = (app.address.clone(), app.admin_token.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
            cmd.args(["events", "list"])
                .env("BATON_URL", url)
                .env("BATON_TOKEN", token)
                .env_remove("BATON_CA");
            if let Some(ca) = ca {
                cmd.arg("--ca").arg(ca);
            }
            cmd.output().expect("run baton")
        })
    };
    let ok = run(Some(pki.ca.clone())).await.expect("baton");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = run(None).await.expect("baton");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cannot reach the api"), "{stderr}");
}
