//! The worker protocol's version: what `Hello.protocol_version` announces, and which versions
//! an api accepts.
//!
//! Upgrade order (docs/operations.md): api replicas first, then workers. An api accepts every
//! worker version from [`MIN_WORKER_PROTOCOL`] to its own [`PROTOCOL_VERSION`]; a worker newer
//! than the api (or one too old) is refused with a message saying which side to upgrade.

/// The protocol version of this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest worker protocol an api of this build accepts. A worker that announces no
/// version (0: built before versions were announced) speaks version 1.
pub const MIN_WORKER_PROTOCOL: u32 = 1;

/// The marker at the start of a refusal's message, so a worker can tell it from other
/// `FAILED_PRECONDITION` answers.
pub const REFUSAL_PREFIX: &str = "unsupported worker protocol";

/// Whether an api of this build talks to a worker announcing `announced`; the error is the
/// message for the worker (and the api's log), naming both versions and what to upgrade.
pub fn check_worker_protocol(announced: u32) -> Result<(), String> {
    let version = if announced == 0 { 1 } else { announced };
    if version > PROTOCOL_VERSION {
        return Err(format!(
            "{REFUSAL_PREFIX}: the worker speaks version {version}, this api speaks \
             {MIN_WORKER_PROTOCOL} to {PROTOCOL_VERSION}; upgrade the api replicas before the workers"
        ));
    }
    if version < MIN_WORKER_PROTOCOL {
        return Err(format!(
            "{REFUSAL_PREFIX}: the worker speaks version {version}, this api needs at least \
             {MIN_WORKER_PROTOCOL}; upgrade the worker"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn this_build_and_older_unversioned_workers_are_accepted() {
        assert_eq!(check_worker_protocol(PROTOCOL_VERSION), Ok(()));
        assert_eq!(check_worker_protocol(0), Ok(()));
    }

    #[test]
    fn a_newer_worker_is_told_to_upgrade_the_api_first() {
        let e = check_worker_protocol(PROTOCOL_VERSION + 1).unwrap_err();
        assert!(e.starts_with(REFUSAL_PREFIX), "{e}");
        assert!(
            e.contains("upgrade the api replicas before the workers"),
            "{e}"
        );
        assert!(
            e.contains(&format!("version {}", PROTOCOL_VERSION + 1)),
            "{e}"
        );
    }
}
