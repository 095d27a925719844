//! A small client for the REST API: bearer auth, and API errors turned into messages.

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Base URL of the api.
    #[arg(
        long,
        env = "BATON_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API token (`baton dev` prints one).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM file of the certificate authority that signed the api's TLS certificate (for an
    /// `https://` URL whose certificate the system does not trust).
    #[arg(long, env = "BATON_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(conn: &Connection) -> anyhow::Result<Self> {
        let token = conn
            .token
            .clone()
            .context("no API token: set BATON_TOKEN or pass --token (baton dev prints one)")?;
        let mut http = reqwest::Client::builder();
        if let Some(path) = &conn.ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("BATON_CA: cannot read {}", path.display()))?;
            let ca = reqwest::Certificate::from_pem(&pem).with_context(|| {
                format!("BATON_CA: {} is not a PEM certificate", path.display())
            })?;
            http = http.add_root_certificate(ca);
        }
        Ok(Self {
            http: http.build().context("cannot set up the HTTP client")?,
            base: conn.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Sends a request and returns the JSON answer, or the API's error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        self.answer(method, path, req).await
    }

    /// `POST path` with a body of the given content type (a YAML document, say).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(body);
        self.answer(Method::POST, path, req).await
    }

    async fn answer(
        &self,
        method: Method,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the api at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{method} {path}: {status}: {message}");
        }
        Ok(value)
    }

    /// Opens a streaming GET (Server-Sent Events) and returns the response once it is 2xx.
    pub async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("cannot reach the api at {}", self.base))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let value: Value = resp.json().await.unwrap_or(Value::Null);
            bail!(
                "GET {path}: {status}: {}",
                value["error"]["message"].as_str().unwrap_or("")
            );
        }
        Ok(resp)
    }

    /// `path` (as the API returns it, e.g. a webhook's `/hooks/KEY`) on this client's api.
    pub fn absolute(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(Method::POST, path, Some(body)).await
    }
}
