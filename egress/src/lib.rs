#![forbid(unsafe_code)]
//! Which addresses Baton's outbound HTTP may reach: the `http` runtime of the worker and the
//! api's outbox (webhook, Slack, Discord). One policy, shared by both, so that a job or an
//! action cannot make Baton call its own internal network (SSRF).
//!
//! By default every address is allowed except loopback, link-local (including cloud metadata
//! at 169.254.169.254), private, shared (CGNAT), unspecified, multicast and reserved ranges
//! ([`blocked_range`]). [`AddressPolicy::allow`] lists CIDRs that are allowed even so
//! (`BATON_HTTP_ALLOW_CIDRS`), for installations that need internal targets.
//!
//! The check is made where it cannot be raced:
//! * a host name is checked after DNS resolution, by the client's own resolver
//!   ([`GuardedResolver`]): the addresses it returns are the ones connected to, so a name that
//!   resolves to a blocked address is refused, and no second lookup can answer differently;
//! * an IP literal in a URL (which the client connects to without resolving) is checked before
//!   the request ([`AddressPolicy::check_url`]);
//! * every redirect is checked the same way before it is followed ([`redirect_policy`]).
//!
//! Build clients with [`client_builder`], which also turns off proxies from the environment
//! (a proxy would resolve the target itself, out of the policy's reach).

mod cidr;
mod client;
mod policy;

pub use cidr::{Cidr, CidrError};
pub use client::{GuardedResolver, client_builder, redirect_policy};
pub use policy::{AddressPolicy, Refused, blocked_range};

/// The environment variable both the api and the worker read the allow-list from.
pub const ALLOW_CIDRS_ENV: &str = "BATON_HTTP_ALLOW_CIDRS";
