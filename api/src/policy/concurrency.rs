//! The concurrency policy of an event: `{"max": N, "key": "{{ input.host }}", "strategy":
//! "queue" | "skip" | "cancel_previous"}`. Runs with the same rendered key form a group;
//! at most `max` jobs of a group are claimed or running at once (the claim enforces it in the
//! database). What happens to a new run whose group is full is the strategy's call, decided
//! here from the group's other unfinished runs.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::model::event::{Concurrency, ConcurrencyStrategy};

/// The longest key stored as is; a longer rendered key is stored as its SHA-256
/// (`sha256:<hex>`), which keeps groups apart without storing unbounded text.
pub const MAX_KEY_BYTES: usize = 256;

/// The group of a run: its rendered key (`""` without a key template: one shared group).
/// A template that fails to render (it was checked when the event was saved, so only a limit
/// such as its fuel can fail it) also gives the shared group: the run is still limited.
pub fn group_key(policy: &Concurrency, input: &Value) -> String {
    let Some(template) = policy.key.as_deref() else {
        return String::new();
    };
    let rendered = match crate::actions::try_render(template, &json!({ "input": input })) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(error = %e, "concurrency key failed to render; using the shared group");
            String::new()
        }
    };
    bounded(rendered.trim())
}

fn bounded(key: &str) -> String {
    if key.len() <= MAX_KEY_BYTES && !key.contains('\0') {
        return key.to_owned();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// One unfinished run of a group, as the admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub id: Uuid,
    /// Queued (not yet claimed): can be ended at once.
    pub queued: bool,
}

/// What to do with a new run and the group's earlier unfinished runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admission {
    /// End the new run at once, `cancelled` with `error.kind = "concurrency"` (strategy
    /// `skip`, group full).
    pub skip_new: bool,
    /// Earlier queued runs to end at once as `cancelled` (kind `concurrency`).
    pub cancel_queued: Vec<Uuid>,
    /// Earlier claimed or running runs to cancel through the worker (their process tree is
    /// killed); the new run waits in the queue until they are gone.
    pub cancel_running: Vec<Uuid>,
}

/// Decides how a new run enters its group. `earlier` are the group's other unfinished runs
/// (queued, claimed or running), oldest first.
///
/// - `queue`: nothing happens now; the claim lets at most `max` run at once.
/// - `skip`: the new run is skipped when the group already holds `max` unfinished runs
///   (queued ones included: they hold their place).
/// - `cancel_previous`: the oldest earlier runs are cancelled until the new run and the
///   newest `max - 1` earlier ones remain; the new run then waits like `queue`.
pub fn admit(policy: &Concurrency, earlier: &[Member]) -> Admission {
    let max = usize::try_from(policy.max.max(1)).unwrap_or(1);
    match policy.strategy {
        ConcurrencyStrategy::Queue => Admission::default(),
        ConcurrencyStrategy::Skip => Admission {
            skip_new: earlier.len() >= max,
            ..Admission::default()
        },
        ConcurrencyStrategy::CancelPrevious => {
            let keep = max - 1;
            let excess = earlier.len().saturating_sub(keep);
            let (queued, running): (Vec<&Member>, Vec<&Member>) =
                earlier[..excess].iter().partition(|m| m.queued);
            Admission {
                skip_new: false,
                cancel_queued: queued.into_iter().map(|m| m.id).collect(),
                cancel_running: running.into_iter().map(|m| m.id).collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: i32, strategy: ConcurrencyStrategy, key: Option<&str>) -> Concurrency {
        Concurrency {
            max,
            key: key.map(str::to_owned),
            strategy,
        }
    }

    fn members(n: usize, queued_from: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: Uuid::from_u128(i as u128 + 1),
                queued: i >= queued_from,
            })
            .collect()
    }

    #[test]
    fn keys_render_from_the_input_and_a_missing_one_is_the_shared_group() {
        let p = policy(1, ConcurrencyStrategy::Queue, Some("{{ input.host }}"));
        assert_eq!(group_key(&p, &json!({"host": "db1"})), "db1");
        assert_eq!(group_key(&p, &json!({"host": "db2"})), "db2");
        assert_eq!(group_key(&p, &json!({})), "", "undefined renders empty");
        assert_eq!(group_key(&p, &json!(null)), "");
        let none = policy(1, ConcurrencyStrategy::Queue, None);
        assert_eq!(group_key(&none, &json!({"host": "db1"})), "");
        let numbers = policy(1, ConcurrencyStrategy::Queue, Some("{{ input.n % 2 }}"));
        assert_eq!(group_key(&numbers, &json!({"n": 3})), "1");
    }

    #[test]
    fn long_keys_and_runaway_templates_stay_bounded() {
        let p = policy(1, ConcurrencyStrategy::Queue, Some("{{ input.s }}"));
        let long = "x".repeat(1000);
        let key = group_key(&p, &json!({"s": long}));
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64, "{key}");
        assert_ne!(key, group_key(&p, &json!({"s": "y".repeat(1000)})));
        let endless = policy(
            1,
            ConcurrencyStrategy::Queue,
            Some(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            ),
        );
        assert_eq!(
            group_key(&endless, &json!({})),
            "",
            "out of fuel: shared group"
        );
    }

    #[test]
    fn queue_never_ends_or_cancels_anything_at_admission() {
        let p = policy(1, ConcurrencyStrategy::Queue, None);
        assert_eq!(admit(&p, &members(5, 1)), Admission::default());
    }

    #[test]
    fn skip_ends_the_new_run_only_when_the_group_is_full() {
        let p = policy(2, ConcurrencyStrategy::Skip, None);
        assert!(!admit(&p, &[]).skip_new);
        assert!(!admit(&p, &members(1, 1)).skip_new);
        assert!(admit(&p, &members(2, 2)).skip_new, "two running");
        assert!(
            admit(&p, &members(2, 0)).skip_new,
            "queued runs hold their place"
        );
        let skipped = admit(&p, &members(3, 1));
        assert!(skipped.cancel_queued.is_empty() && skipped.cancel_running.is_empty());
    }

    #[test]
    fn cancel_previous_keeps_the_newest_max_minus_one() {
        let one = policy(1, ConcurrencyStrategy::CancelPrevious, None);
        let all = admit(&one, &members(3, 2));
        assert!(!all.skip_new);
        assert_eq!(
            all.cancel_running,
            vec![Uuid::from_u128(1), Uuid::from_u128(2)]
        );
        assert_eq!(all.cancel_queued, vec![Uuid::from_u128(3)]);
        let three = policy(3, ConcurrencyStrategy::CancelPrevious, None);
        let some = admit(&three, &members(4, 4));
        assert_eq!(
            some.cancel_running,
            vec![Uuid::from_u128(1), Uuid::from_u128(2)]
        );
        assert!(admit(&three, &members(2, 0)).cancel_queued.is_empty());
        assert_eq!(admit(&one, &[]), Admission::default());
    }
}
