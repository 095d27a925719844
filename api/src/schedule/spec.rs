//! The pure schedule policy: validation, fire times, DST rules, jitter and the `missed` policy.
//!
//! Nothing here reads a clock or the database: every function takes the instants it needs.
//!
//! Fire times ("slots") are nominal instants, whole seconds, in UTC:
//! - a `cron` schedule's slots are the instants whose wall-clock time in `timezone` matches
//!   the pattern (5 fields, or 6 with seconds first; `@hourly`-style macros), with two DST
//!   rules: a wall-clock time that does not exist (spring forward) fires once, at the first
//!   valid instant after the gap; a wall-clock time that occurs twice (fall back) fires once,
//!   at its first occurrence (the repeated pass is skipped);
//! - an `interval_seconds` schedule's slots are `anchor + k × interval` (the anchor is
//!   `start_at`, or the schedule's creation time);
//! - both are bounded by `start_at` (first slot at or after it) and `end_at` (none after it).
//!
//! A schedule fires a slot at `slot + jitter`, where the jitter is a stable per-schedule
//! offset in `0..=jitter_seconds` (derived from the schedule id).

use std::collections::VecDeque;
use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::model::{FieldError, text_enum};

/// Largest accepted `interval_seconds` (one year).
pub const MAX_INTERVAL_SECONDS: i64 = 366 * 24 * 3600;
/// Largest accepted `jitter_seconds` (one hour).
pub const MAX_JITTER_SECONDS: i32 = 3600;
/// Largest accepted `max_catch_up`.
pub const MAX_CATCH_UP: i32 = 1000;
/// Default `max_catch_up`.
pub const DEFAULT_MAX_CATCH_UP: i32 = 100;
/// A slot at most this late is late, not missed: it fires whatever `missed` says (a replica
/// behind its wake-up time under load, or a short stall, must not drop slots of a frequent
/// schedule). `missed` decides only about slots overdue by more: those passed while no
/// replica was firing, or while the schedule was paused.
pub const ON_TIME_GRACE: Duration = Duration::seconds(60);
/// Forward steps taken before a far-behind schedule jumps back from "now" instead.
const FORWARD_STEP_CAP: usize = 10_000;

/// What to do with slots that passed while no replica fired them (all down, or paused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Fire none of them (the latest still fires if it is less than a minute late).
    None,
    /// Fire the latest one once.
    #[default]
    Last,
    /// Fire each of them, at most `max_catch_up` (the latest ones).
    All,
}
text_enum!(Missed { None => "none", Last => "last", All => "all" });

/// A schedule's definition, as `POST /events/{id}/schedules` takes it and the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFields {
    /// Cron pattern: 5 fields, or 6 with seconds first; or a macro (`@hourly`, `@daily`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Fire every this many seconds (≥ 1), instead of `cron`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<i64>,
    /// IANA time zone the cron pattern is read in (default `UTC`).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default)]
    pub missed: Missed,
    /// Cap on the slots fired at once with `missed: all` (default 100).
    #[serde(default = "default_max_catch_up")]
    pub max_catch_up: i32,
    /// Spread fires by a stable per-schedule offset of up to this many seconds.
    #[serde(default)]
    pub jitter_seconds: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_at: Option<DateTime<Utc>>,
    /// Given to each run as its input.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// A paused schedule fires nothing; on resume, the slots it missed follow `missed`.
    #[serde(default)]
    pub paused: bool,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_max_catch_up() -> i32 {
    DEFAULT_MAX_CATCH_UP
}

#[derive(Debug, Clone)]
enum Kind {
    Cron(Box<Cron>),
    Interval(i64),
}

/// A validated schedule: computes its slots.
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    kind: Kind,
    tz: Tz,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    /// Where interval slots count from.
    anchor: DateTime<Utc>,
    jitter: Duration,
    missed: Missed,
    max_catch_up: usize,
}

/// What to do with a schedule evaluated at some instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// The nominal slots to fire now, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Due slots passed over by the `missed` policy (a lower bound when very many were).
    pub passed_over: u64,
    /// The next nominal slot not yet due (None: the schedule has ended).
    pub next: Option<DateTime<Utc>>,
}

/// Whole seconds only: slots are whole seconds.
fn floor_second(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).expect("a whole second of a valid instant")
}

impl ScheduleSpec {
    /// Validates `fields` for the schedule `id`; `anchor` is where interval slots count from
    /// when there is no `start_at` (the creation time). Errors name the field.
    pub fn compile(
        fields: &ScheduleFields,
        id: Uuid,
        anchor: DateTime<Utc>,
    ) -> Result<Self, FieldError> {
        let tz = Tz::from_str(&fields.timezone).map_err(|_| {
            FieldError::new(
                "timezone",
                format!(
                    "unknown time zone {:?} (use an IANA name such as Europe/Paris)",
                    fields.timezone
                ),
            )
        })?;
        let kind = match (&fields.cron, fields.interval_seconds) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "cron",
                    "give either cron or interval_seconds, not both",
                ));
            }
            (None, None) => {
                return Err(FieldError::new(
                    "cron",
                    "a schedule needs cron or interval_seconds",
                ));
            }
            (None, Some(secs)) => {
                if !(1..=MAX_INTERVAL_SECONDS).contains(&secs) {
                    return Err(FieldError::new(
                        "interval_seconds",
                        format!("must be between 1 and {MAX_INTERVAL_SECONDS}"),
                    ));
                }
                Kind::Interval(secs)
            }
            (Some(pattern), None) => {
                if pattern.len() > 256 {
                    return Err(FieldError::new("cron", "at most 256 characters"));
                }
                let trimmed = pattern.trim();
                let fields_count = trimmed.split_whitespace().count();
                if !trimmed.starts_with('@') && !(5..=6).contains(&fields_count) {
                    return Err(FieldError::new(
                        "cron",
                        format!("expected 5 or 6 fields (seconds first), got {fields_count}"),
                    ));
                }
                let cron = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .build()
                    .parse(trimmed)
                    .map_err(|e| FieldError::new("cron", format!("invalid cron pattern: {e}")))?;
                Kind::Cron(Box::new(cron))
            }
        };
        if !(0..=MAX_JITTER_SECONDS).contains(&fields.jitter_seconds) {
            return Err(FieldError::new(
                "jitter_seconds",
                format!("must be between 0 and {MAX_JITTER_SECONDS}"),
            ));
        }
        if !(1..=MAX_CATCH_UP).contains(&fields.max_catch_up) {
            return Err(FieldError::new(
                "max_catch_up",
                format!("must be between 1 and {MAX_CATCH_UP}"),
            ));
        }
        if let (Some(start), Some(end)) = (fields.start_at, fields.end_at)
            && end <= start
        {
            return Err(FieldError::new("end_at", "must be after start_at"));
        }
        let jitter_range = u128::from(fields.jitter_seconds.unsigned_abs()) + 1;
        let jitter = Duration::seconds((id.as_u128() % jitter_range) as i64);
        let spec = Self {
            kind,
            tz,
            start_at: fields.start_at.map(floor_second),
            end_at: fields.end_at,
            anchor: floor_second(fields.start_at.unwrap_or(anchor)),
            jitter,
            missed: fields.missed,
            max_catch_up: fields.max_catch_up as usize,
        };
        // A pattern that never matches (`0 0 31 2 *`) is refused rather than stored dead.
        if let Kind::Cron(cron) = &spec.kind
            && cron
                .find_next_occurrence(&anchor.with_timezone(&tz), false)
                .is_err()
        {
            return Err(FieldError::new("cron", "the pattern never fires"));
        }
        Ok(spec)
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// This schedule's stable offset added to every slot.
    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    /// When the slot `nominal` is due to fire (`nominal + jitter`).
    pub fn due_at(&self, nominal: DateTime<Utc>) -> DateTime<Utc> {
        nominal + self.jitter
    }

    /// The first slot strictly after `t` (None when the schedule has ended).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut from = floor_second(t);
        if let Some(start) = self.start_at
            && from < start
        {
            // The first slot at or after start_at.
            from = start - Duration::seconds(1);
        }
        let slot = match &self.kind {
            Kind::Interval(secs) => {
                let step = *secs;
                let anchor = self.anchor;
                if from < anchor {
                    anchor
                } else {
                    let k = (from - anchor).num_seconds() / step + 1;
                    anchor + Duration::seconds(k.checked_mul(step)?)
                }
            }
            Kind::Cron(cron) => self.cron_next(cron, from)?,
        };
        match self.end_at {
            Some(end) if slot > end => None,
            _ => Some(slot),
        }
    }

    /// The first cron slot strictly after `from`, skipping the repeated pass of a fall-back.
    fn cron_next(&self, cron: &Cron, mut from: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Each round either returns or moves past a repeated pass; a zone has few per year.
        for _ in 0..16 {
            let found = cron
                .find_next_occurrence(&from.with_timezone(&self.tz), false)
                .ok()?
                .with_timezone(&Utc);
            match self
                .tz
                .from_local_datetime(&found.with_timezone(&self.tz).naive_local())
            {
                LocalResult::Ambiguous(earlier, later)
                    if later.with_timezone(&Utc) == found
                        && earlier.with_timezone(&Utc) != found =>
                {
                    // This wall-clock time already occurred (and fired) in the first pass.
                    from = self.repeated_pass_end(earlier.with_timezone(&Utc), found)
                        - Duration::seconds(1);
                }
                _ => return Some(found),
            }
        }
        None
    }

    /// The first instant after the repeated pass of a fall-back, given an instant `earlier`
    /// in the first pass and `later` in the repeated one, with the same wall-clock time.
    fn repeated_pass_end(&self, earlier: DateTime<Utc>, later: DateTime<Utc>) -> DateTime<Utc> {
        let offset = |secs: i64| {
            self.tz
                .offset_from_utc_datetime(
                    &DateTime::from_timestamp(secs, 0)
                        .expect("a valid instant")
                        .naive_utc(),
                )
                .fix()
                .local_minus_utc() as i64
        };
        let (mut lo, mut hi) = (earlier.timestamp(), later.timestamp());
        let later_offset = offset(hi);
        // lo is before the transition, hi after: find the transition's first second.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if offset(mid) == later_offset {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let repeated = offset(lo) - later_offset;
        DateTime::from_timestamp(hi + repeated, 0).expect("a valid instant")
    }

    /// The next `n` slots strictly after `t`.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut cur = t;
        while out.len() < n {
            match self.next_after(cur) {
                Some(slot) => {
                    out.push(slot);
                    cur = slot;
                }
                None => break,
            }
        }
        out
    }

    /// [`Self::upcoming`] as RFC 3339 text in the schedule's time zone (with its offset).
    pub fn upcoming_rfc3339(&self, t: DateTime<Utc>, n: usize) -> Vec<String> {
        self.upcoming(t, n)
            .into_iter()
            .map(|slot| slot.with_timezone(&self.tz).to_rfc3339())
            .collect()
    }

    /// Decides what a schedule whose next unfired slot is `next` does at `now`: which slots
    /// fire and the next slot after them. Slots due within [`ON_TIME_GRACE`] of `now` all fire;
    /// older ones (missed) follow `missed`: `all` fires the latest `max_catch_up` of them,
    /// `last` the latest one unless a slot within the grace fires anyway, `none` none.
    pub fn decide(&self, next: DateTime<Utc>, now: DateTime<Utc>) -> Slots {
        self.decide_with_grace(next, now, ON_TIME_GRACE)
    }

    /// Where a schedule resumed at `now` (paused, its next unfired slot `next`) continues:
    /// every slot that passed while it was paused was missed, however recent, so `missed`
    /// alone decides which of them still fire. Returns the new next unfired slot: the first
    /// slot kept, or the first after `now`.
    pub fn on_resume(&self, next: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let slots = self.decide_with_grace(next, now, Duration::zero());
        slots.fire.first().copied().or(slots.next)
    }

    fn decide_with_grace(&self, next: DateTime<Utc>, now: DateTime<Utc>, grace: Duration) -> Slots {
        // Slots whose fire time (slot + jitter) has come.
        let cutoff = now - self.jitter;
        if next > cutoff {
            return Slots {
                fire: Vec::new(),
                passed_over: 0,
                next: Some(next),
            };
        }
        // Slots before this one are missed rather than late.
        let missed_before = cutoff - grace;
        let keep_missed = match self.missed {
            Missed::All => self.max_catch_up,
            Missed::Last => 1,
            Missed::None => 0,
        };
        let mut missed: VecDeque<DateTime<Utc>> = VecDeque::with_capacity(keep_missed.min(64));
        let mut late: Vec<DateTime<Utc>> = Vec::new();
        let mut passed_over: u64 = 0;
        let mut cur = Some(next);
        let mut steps = 0usize;
        while let Some(slot) = cur.filter(|s| *s <= cutoff) {
            steps += 1;
            if steps == FORWARD_STEP_CAP {
                // Far behind: start again a few slots before the grace window.
                let restart = self.rewind(missed_before, keep_missed + 1).max(slot);
                passed_over += (missed.len() + late.len()) as u64 + 1;
                missed.clear();
                late.clear();
                cur = Some(restart);
                continue;
            }
            if slot >= missed_before {
                late.push(slot);
            } else if keep_missed == 0 {
                passed_over += 1;
            } else {
                if missed.len() == keep_missed {
                    missed.pop_front();
                    passed_over += 1;
                }
                missed.push_back(slot);
            }
            cur = self.next_after(slot);
        }
        if self.missed == Missed::Last && !late.is_empty() {
            // The latest slot fires anyway: the missed one is not needed.
            passed_over += missed.len() as u64;
            missed.clear();
        }
        let mut fire: Vec<DateTime<Utc>> = missed.into();
        fire.extend(late);
        Slots {
            fire,
            passed_over,
            next: cur,
        }
    }

    /// A slot at or before the `n`-th slot counting back from `cutoff` (or the earliest
    /// slot): where a far-behind schedule resumes counting.
    fn rewind(&self, cutoff: DateTime<Utc>, n: usize) -> DateTime<Utc> {
        match &self.kind {
            Kind::Interval(step) => {
                let back = (cutoff - self.anchor).num_seconds() / step - n as i64;
                self.anchor + Duration::seconds(back.max(0) * step)
            }
            Kind::Cron(cron) => {
                let mut at = cutoff.with_timezone(&self.tz);
                for _ in 0..n {
                    match cron.find_previous_occurrence(&at, false) {
                        Ok(prev) => at = prev,
                        Err(_) => break,
                    }
                }
                let at = at.with_timezone(&Utc);
                // Snap onto the canonical (forward) slots.
                self.next_after(at - Duration::seconds(1)).unwrap_or(at)
            }
        }
    }
}

#[cfg(test)]
mod tests;
