//! A reqwest client that keeps to an [`AddressPolicy`]: its resolver, its redirect policy and
//! [`client_builder`].

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::policy::{AddressPolicy, Refused};

/// Most redirects followed (as reqwest's default policy).
const MAX_REDIRECTS: usize = 10;

/// Resolves host names with the system resolver and keeps only the addresses the policy
/// allows; a name with none left is refused (the error names the address and its range). The
/// client connects to exactly the addresses returned here, so nothing can change between the
/// check and the connection.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<AddressPolicy>) -> Self {
        GuardedResolver { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal: Option<Refused> = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(Some(&host), addr.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                return Err(match first_refusal {
                    Some(refused) => refused.into(),
                    None => format!("`{host}` resolves to no address").into(),
                });
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Follows up to 10 redirects to `http`/`https` URLs whose IP literal, if any, the policy
/// allows (a redirect to a host name is checked by the resolver when it is connected to).
pub fn redirect_policy(policy: Arc<AddressPolicy>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let url = attempt.url();
        if !matches!(url.scheme(), "http" | "https") {
            let message = format!("redirect to a `{}` URL refused", url.scheme());
            return attempt.error(message);
        }
        match policy.check_url(url) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// A client builder that keeps to `policy`: the guarded resolver, the checking redirect
/// policy, and no proxy (a proxy from the environment would reach the target on its own,
/// unchecked). Callers still check the request URL itself with
/// [`AddressPolicy::check_url`], for IP literals.
pub fn client_builder(policy: AddressPolicy) -> reqwest::ClientBuilder {
    let policy = Arc::new(policy);
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(GuardedResolver::new(policy.clone()))
        .redirect(redirect_policy(policy))
}
