//! The CLI's side of the admin API: `mirrormesh status`, `peers`, `repos`, `publish --admin`, `wait`.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;

use crate::admin::REQUEST_HEADER;
use crate::status::{PeerStatus, PublishReply, RepoStatus, Status};

/// How a long-poll of `/wait` ended, with the node's status then.
#[derive(Debug)]
pub enum Waited {
    Reached(Status),
    TimedOut(Status),
}

/// A client for one daemon's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// `addr` is `host:port` (as in `admin.listen`) or a full `http://` URL.
    pub fn new(addr: &str, token: Option<String>, timeout: Duration) -> Self {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        let config = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
        Self { base, token, agent: config.into() }
    }

    fn call<T: DeserializeOwned>(&self, method: &str, path: &str) -> Result<T> {
        let (url, code, body) = self.send(method, path)?;
        self.decode(&url, code, &body)
    }

    /// Sends a request; returns its URL, the answer's status code and body.
    fn send(&self, method: &str, path: &str) -> Result<(String, u16, String)> {
        self.send_with(method, path, None)
    }

    /// Sends a request with a JSON body (POST only).
    fn send_with(&self, method: &str, path: &str, json: Option<&serde_json::Value>) -> Result<(String, u16, String)> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            "POST" => {
                // Not a browser: say so, as the API requires of every POST when it has no token.
                let mut req = self.agent.post(&url).header(REQUEST_HEADER, "1");
                if let Some(auth) = &auth {
                    req = req.header("authorization", auth);
                }
                match json {
                    Some(json) => req.header("content-type", "application/json").send(json.to_string()),
                    None => req.send_empty(),
                }
            }
            _ => {
                let mut req = self.agent.get(&url);
                if let Some(auth) = &auth {
                    req = req.header("authorization", auth);
                }
                req.call()
            }
        };
        let mut response = result.map_err(|e| anyhow!("cannot reach the mirrormesh daemon at {}: {e}", self.base))?;
        let code = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(|e| anyhow!("reading the answer from {url}: {e}"))?;
        Ok((url, code, body))
    }

    fn decode<T: DeserializeOwned>(&self, url: &str, code: u16, body: &str) -> Result<T> {
        match code {
            200 => serde_json::from_str(body).map_err(|e| anyhow!("unexpected answer from {url}: {e}")),
            401 => bail!("{url}: unauthorized (give the admin token with --token or MIRRORMESH_TOKEN)"),
            403 => bail!("{url}: refused: {}", body.trim()),
            421 => bail!(
                "{url}: refused (give the daemon's admin.listen address or a name in its admin.hosts): {}",
                body.trim()
            ),
            _ => bail!("{url}: HTTP {code}: {}", body.trim()),
        }
    }

    pub fn status(&self) -> Result<Status> {
        self.call("GET", "/status")
    }

    pub fn peers(&self) -> Result<Vec<PeerStatus>> {
        self.call("GET", "/peers")
    }

    pub fn repos(&self) -> Result<Vec<RepoStatus>> {
        self.call("GET", "/repos")
    }

    pub fn publish(&self) -> Result<PublishReply> {
        self.call("POST", "/publish")
    }

    /// Publishes whatever the publish checks say (an empty tree, many removals).
    pub fn publish_forced(&self) -> Result<PublishReply> {
        self.call("POST", "/publish?force=true")
    }

    /// Publishes reading only `paths` (relative to the tree) and their directories; `force` as for
    /// [`Self::publish_forced`].
    pub fn publish_paths(&self, paths: &[String], force: bool) -> Result<PublishReply> {
        let path = if force { "/publish?force=true" } else { "/publish" };
        let (url, code, body) = self.send_with("POST", path, Some(&serde_json::json!({ "paths": paths })))?;
        self.decode(&url, code, &body)
    }

    /// Long-polls `/wait?{query}` (conditions as the admin API documents them) for at most `timeout_ms`
    /// (the API caps it at [`crate::admin::WAIT_MAX`]); a timeout is an answer, not an error.
    pub fn wait_until(&self, query: &str, timeout_ms: u64) -> Result<Waited> {
        let (url, code, body) = self.send("GET", &format!("/wait?{query}&timeout_ms={timeout_ms}"))?;
        if code == 408 {
            let status = serde_json::from_str(&body).map_err(|e| anyhow!("unexpected answer from {url}: {e}"))?;
            return Ok(Waited::TimedOut(status));
        }
        self.decode(&url, code, &body).map(Waited::Reached)
    }

    /// Blocks until the node's applied snapshot reaches `seq` (or the timeout, in milliseconds, passes).
    pub fn wait_for_seq(&self, seq: u64, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?seq={seq}&timeout_ms={timeout_ms}"))
    }

    /// Blocks until the node applied `seq`, is idle and has no removal pending.
    pub fn wait_settled(&self, seq: u64, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?seq={seq}&settled=true&timeout_ms={timeout_ms}"))
    }

    /// Blocks until every peer connected to the node holds snapshot `seq` completely (as the node knows).
    pub fn wait_peers_at(&self, seq: u64, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?peers_at={seq}&timeout_ms={timeout_ms}"))
    }

    /// Blocks until the node's counter `name` reaches `at_least`.
    pub fn wait_counter(&self, name: &str, at_least: u64, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?counter={name}&at_least={at_least}&timeout_ms={timeout_ms}"))
    }

    /// Blocks until the node is waiting for chunks that only the (unreachable) origin has.
    pub fn wait_waiting_for_origin(&self, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?waiting_for_origin=true&timeout_ms={timeout_ms}"))
    }

    /// Blocks until at least `peers` peers are connected to the node.
    pub fn wait_connected(&self, peers: usize, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?connected={peers}&timeout_ms={timeout_ms}"))
    }

    /// Blocks until the node knows at least `members` nodes of the fabric (itself included).
    pub fn wait_members(&self, members: u64, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?members={members}&timeout_ms={timeout_ms}"))
    }

    /// Blocks until the node has fetched at least `bytes` chunk bytes.
    pub fn wait_fetched(&self, bytes: u64, timeout_ms: u64) -> Result<Status> {
        self.call("GET", &format!("/wait?fetched_bytes={bytes}&timeout_ms={timeout_ms}"))
    }
}
