#![allow(clippy::unwrap_used)] // a panic is how a test reports a failure

use super::*;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("test instant")
        .with_timezone(&Utc)
}

fn cron(pattern: &str, tz: &str) -> ScheduleSpec {
    let fields = ScheduleFields {
        cron: Some(pattern.into()),
        timezone: tz.into(),
        max_catch_up: DEFAULT_MAX_CATCH_UP,
        ..ScheduleFields::default()
    };
    ScheduleSpec::compile(&fields, Uuid::nil(), utc("2026-01-01T00:00:00Z")).expect("valid")
}

fn with(fields: ScheduleFields) -> Result<ScheduleSpec, FieldError> {
    ScheduleSpec::compile(&fields, Uuid::nil(), utc("2026-01-01T00:00:00Z"))
}

fn interval(secs: i64) -> ScheduleFields {
    ScheduleFields {
        interval_seconds: Some(secs),
        timezone: "UTC".into(),
        max_catch_up: DEFAULT_MAX_CATCH_UP,
        ..ScheduleFields::default()
    }
}

fn upcoming(spec: &ScheduleSpec, from: &str, n: usize) -> Vec<DateTime<Utc>> {
    spec.upcoming(utc(from), n)
}

// Europe/Paris 2026: spring forward 29 March 02:00 CET → 03:00 CEST (01:00 UTC);
// fall back 25 October 03:00 CEST → 02:00 CET (01:00 UTC).
#[test]
fn paris_spring_forward_fixed_time_fires_once_after_the_gap() {
    let spec = cron("30 2 * * *", "Europe/Paris");
    assert_eq!(
        upcoming(&spec, "2026-03-28T12:00:00Z", 2),
        vec![
            // 02:30 does not exist: the first valid instant after it, 03:00 CEST.
            utc("2026-03-29T03:00:00+02:00"),
            utc("2026-03-30T02:30:00+02:00"),
        ]
    );
}

#[test]
fn paris_fall_back_fixed_time_fires_once() {
    let spec = cron("30 2 * * *", "Europe/Paris");
    assert_eq!(
        upcoming(&spec, "2026-10-24T12:00:00Z", 2),
        vec![
            // 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET): once.
            utc("2026-10-25T02:30:00+02:00"),
            utc("2026-10-26T02:30:00+01:00"),
        ]
    );
}

#[test]
fn paris_fall_back_wildcard_skips_the_repeated_pass() {
    let spec = cron("*/30 * * * *", "Europe/Paris");
    assert_eq!(
        upcoming(&spec, "2026-10-24T23:59:00Z", 4),
        vec![
            utc("2026-10-25T02:00:00+02:00"),
            utc("2026-10-25T02:30:00+02:00"),
            // 02:00 and 02:30 CET repeat wall-clock times that already fired.
            utc("2026-10-25T03:00:00+01:00"),
            utc("2026-10-25T03:30:00+01:00"),
        ]
    );
}

#[test]
fn paris_spring_forward_wildcard_fires_once_at_the_end_of_the_gap() {
    let spec = cron("*/30 * * * *", "Europe/Paris");
    assert_eq!(
        upcoming(&spec, "2026-03-29T00:00:00Z", 3),
        vec![
            utc("2026-03-29T01:30:00+01:00"),
            utc("2026-03-29T03:00:00+02:00"),
            utc("2026-03-29T03:30:00+02:00"),
        ]
    );
}

// America/New_York 2026: spring forward 8 March 02:00 EST → 03:00 EDT (07:00 UTC);
// fall back 1 November 02:00 EDT → 01:00 EST (06:00 UTC).
#[test]
fn new_york_spring_forward_six_fields() {
    let spec = cron("0 30 2 * * *", "America/New_York");
    assert_eq!(
        upcoming(&spec, "2026-03-07T12:00:00Z", 2),
        vec![
            utc("2026-03-08T03:00:00-04:00"),
            utc("2026-03-09T02:30:00-04:00"),
        ]
    );
    let every_quarter = cron("*/15 * * * *", "America/New_York");
    assert_eq!(
        upcoming(&every_quarter, "2026-03-08T01:40:00-05:00", 2),
        vec![
            utc("2026-03-08T01:45:00-05:00"),
            utc("2026-03-08T03:00:00-04:00"),
        ]
    );
}

#[test]
fn new_york_fall_back_fires_once() {
    let spec = cron("30 1 * * *", "America/New_York");
    assert_eq!(
        upcoming(&spec, "2026-10-31T12:00:00Z", 2),
        vec![
            utc("2026-11-01T01:30:00-04:00"),
            utc("2026-11-02T01:30:00-05:00"),
        ]
    );
    // Hourly through the fall-back night: one fire per wall-clock hour.
    let hourly = cron("@hourly", "America/New_York");
    assert_eq!(
        upcoming(&hourly, "2026-11-01T00:30:00-04:00", 3),
        vec![
            utc("2026-11-01T01:00:00-04:00"),
            // 01:00 EST repeats 01:00 EDT.
            utc("2026-11-01T02:00:00-05:00"),
            utc("2026-11-01T03:00:00-05:00"),
        ]
    );
}

#[test]
fn catch_up_over_a_dst_night_counts_each_wall_clock_slot_once() {
    let spec = with(ScheduleFields {
        cron: Some("0 * * * *".into()),
        timezone: "Europe/Paris".into(),
        missed: Missed::All,
        max_catch_up: 100,
        ..ScheduleFields::default()
    })
    .unwrap();
    let first = utc("2026-10-25T00:00:00+02:00");
    let slots = spec.decide(first, utc("2026-10-25T05:00:30+01:00"));
    // 00, 01, 02 (CEST), 03, 04, 05 (CET): 02 CET repeats and does not fire.
    assert_eq!(slots.fire.len(), 6, "{:?}", slots.fire);
    assert_eq!(slots.next, Some(utc("2026-10-25T06:00:00+01:00")));
}

#[test]
fn macros_and_field_counts() {
    let daily = cron("@daily", "Europe/Paris");
    assert_eq!(
        upcoming(&daily, "2026-06-01T12:00:00Z", 1),
        vec![utc("2026-06-02T00:00:00+02:00")]
    );
    let five = cron("5 * * * *", "UTC");
    assert_eq!(
        upcoming(&five, "2026-06-01T12:00:00Z", 2),
        vec![utc("2026-06-01T12:05:00Z"), utc("2026-06-01T13:05:00Z")]
    );
    let six = cron("*/10 * * * * *", "UTC");
    assert_eq!(
        upcoming(&six, "2026-06-01T12:00:00.5Z", 2),
        vec![utc("2026-06-01T12:00:10Z"), utc("2026-06-01T12:00:20Z")]
    );
    // The display keeps the zone's offset.
    assert_eq!(
        daily.upcoming_rfc3339(utc("2026-06-01T12:00:00Z"), 1),
        vec!["2026-06-02T00:00:00+02:00".to_owned()]
    );
}

#[test]
fn intervals_count_from_the_anchor_within_bounds() {
    let spec = with(interval(30)).unwrap();
    assert_eq!(
        upcoming(&spec, "2025-12-31T00:00:00Z", 1),
        vec![utc("2026-01-01T00:00:00Z")]
    );
    assert_eq!(
        upcoming(&spec, "2026-01-01T00:00:45Z", 2),
        vec![utc("2026-01-01T00:01:00Z"), utc("2026-01-01T00:01:30Z")]
    );
    let bounded = with(ScheduleFields {
        start_at: Some(utc("2026-02-01T00:00:10Z")),
        end_at: Some(utc("2026-02-01T00:01:00Z")),
        ..interval(20)
    })
    .unwrap();
    assert_eq!(
        upcoming(&bounded, "2026-01-01T00:00:00Z", 10),
        vec![
            utc("2026-02-01T00:00:10Z"),
            utc("2026-02-01T00:00:30Z"),
            utc("2026-02-01T00:00:50Z"),
        ]
    );
    let cron_bounded = with(ScheduleFields {
        cron: Some("0 0 * * *".into()),
        timezone: "UTC".into(),
        max_catch_up: 1,
        start_at: Some(utc("2026-03-03T00:00:00Z")),
        end_at: Some(utc("2026-03-04T12:00:00Z")),
        ..ScheduleFields::default()
    })
    .unwrap();
    assert_eq!(
        upcoming(&cron_bounded, "2026-01-01T00:00:00Z", 5),
        vec![utc("2026-03-03T00:00:00Z"), utc("2026-03-04T00:00:00Z")]
    );
}

#[test]
fn validation_names_the_field() {
    let field = |fields: ScheduleFields| with(fields).unwrap_err().field;
    let mut both = ScheduleFields {
        cron: Some("* * * * *".into()),
        ..interval(1)
    };
    assert_eq!(field(both.clone()), "cron");
    both.interval_seconds = None;
    assert!(with(both).is_ok());
    for pattern in [
        "not a cron",
        "61 * * * *",
        "* * * *",
        "0 0 0 * * * * *",
        "0 0 31 2 *",
    ] {
        let f = ScheduleFields {
            cron: Some(pattern.into()),
            timezone: "UTC".into(),
            max_catch_up: 1,
            ..ScheduleFields::default()
        };
        assert_eq!(field(f), "cron", "{pattern}");
    }
    assert_eq!(
        field(ScheduleFields {
            interval_seconds: None,
            ..interval(1)
        }),
        "cron"
    );
    assert_eq!(field(interval(0)), "interval_seconds");
    assert_eq!(field(interval(-5)), "interval_seconds");
    assert_eq!(
        field(ScheduleFields {
            timezone: "Mars/Olympus".into(),
            ..interval(1)
        }),
        "timezone"
    );
    assert_eq!(
        field(ScheduleFields {
            start_at: Some(utc("2026-02-01T00:00:00Z")),
            end_at: Some(utc("2026-01-01T00:00:00Z")),
            ..interval(1)
        }),
        "end_at"
    );
    assert_eq!(
        field(ScheduleFields {
            jitter_seconds: -1,
            ..interval(1)
        }),
        "jitter_seconds"
    );
    assert_eq!(
        field(ScheduleFields {
            max_catch_up: 0,
            ..interval(1)
        }),
        "max_catch_up"
    );
}

#[test]
fn jitter_is_a_stable_offset_within_range() {
    let fields = ScheduleFields {
        jitter_seconds: 10,
        ..interval(60)
    };
    let anchor = utc("2026-01-01T00:00:00Z");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let id = Uuid::now_v7();
        let a = ScheduleSpec::compile(&fields, id, anchor).unwrap();
        let b = ScheduleSpec::compile(&fields, id, anchor).unwrap();
        assert_eq!(a.jitter(), b.jitter());
        assert!((0..=10).contains(&a.jitter().num_seconds()));
        seen.insert(a.jitter().num_seconds());
        let slot = a.next_after(anchor).unwrap();
        assert_eq!(a.due_at(slot), slot + a.jitter());
        // Not due before slot + jitter; due at it.
        let early = a.decide(slot, slot + a.jitter() - Duration::milliseconds(1));
        assert!(early.fire.is_empty());
        assert_eq!(a.decide(slot, slot + a.jitter()).fire, vec![slot]);
    }
    assert!(seen.len() > 5, "offsets spread: {seen:?}");
}

fn missed(mode: Missed, max: i32) -> ScheduleSpec {
    with(ScheduleFields {
        missed: mode,
        max_catch_up: max,
        ..interval(10)
    })
    .unwrap()
}

#[test]
fn on_time_evaluation_fires_the_due_slot_in_every_mode() {
    for mode in Missed::ALL {
        let spec = missed(*mode, 100);
        let slot = utc("2026-01-01T00:00:10Z");
        let slots = spec.decide(slot, slot + Duration::milliseconds(20));
        assert_eq!(slots.fire, vec![slot], "{mode}");
        assert_eq!(slots.next, Some(utc("2026-01-01T00:00:20Z")));
        let early = spec.decide(slot, slot - Duration::milliseconds(1));
        assert!(early.fire.is_empty());
        assert_eq!(early.next, Some(slot));
    }
}

#[test]
fn missed_modes_after_an_outage() {
    // Next unfired slot 00:00:10; evaluated at 00:10:05: 60 slots (00:00:10 … 00:10:00) passed.
    let next = utc("2026-01-01T00:00:10Z");
    let now = utc("2026-01-01T00:10:05Z");
    let after = Some(utc("2026-01-01T00:10:10Z"));

    let all = missed(Missed::All, 100).decide(next, now);
    assert_eq!(all.fire.len(), 60);
    assert_eq!(all.fire[0], next);
    assert_eq!(all.fire[59], utc("2026-01-01T00:10:00Z"));
    assert_eq!((all.passed_over, all.next), (0, after));

    // The 6 slots of the last minute (00:09:10 … 00:10:00) are late, not missed: they fire
    // in every mode; the 54 before them follow `missed`.
    let late: Vec<_> = all.fire[54..].to_vec();
    assert_eq!(late[0], utc("2026-01-01T00:09:10Z"));

    let capped = missed(Missed::All, 7).decide(next, now);
    assert_eq!(capped.fire.len(), 13);
    assert_eq!(capped.fire[0], utc("2026-01-01T00:08:00Z"));
    assert_eq!(capped.fire[6], utc("2026-01-01T00:09:00Z"));
    assert_eq!(capped.fire[7..], late[..]);
    assert_eq!((capped.passed_over, capped.next), (47, after));

    let last = missed(Missed::Last, 100).decide(next, now);
    assert_eq!(last.fire, late);
    assert_eq!((last.passed_over, last.next), (54, after));

    let none = missed(Missed::None, 100).decide(next, now);
    assert_eq!(none.fire, late);
    assert_eq!((none.passed_over, none.next), (54, after));

    // An interval longer than the grace, down past a slot: `last` fires that slot (missed),
    // `none` nothing.
    let five_minutes = |mode| {
        with(ScheduleFields {
            missed: mode,
            ..interval(300)
        })
        .unwrap()
    };
    let slot = utc("2026-01-01T00:05:00Z");
    let down = slot + Duration::seconds(90);
    let last = five_minutes(Missed::Last).decide(slot - Duration::seconds(300), down);
    assert_eq!(last.fire, vec![slot]);
    assert_eq!(last.passed_over, 1);
    assert!(
        five_minutes(Missed::None)
            .decide(slot, down)
            .fire
            .is_empty()
    );

    // A schedule every 10 s fired 50 s late (a stalled replica): nothing is dropped.
    let stalled = missed(Missed::Last, 100).decide(next, next + Duration::seconds(50));
    assert_eq!(stalled.fire.len(), 6);
    assert_eq!(stalled.passed_over, 0);

    // An hourly schedule down for half an hour past its slot: `none` fires nothing.
    let hourly = with(ScheduleFields {
        missed: Missed::None,
        ..interval(3600)
    })
    .unwrap();
    let slot = utc("2026-01-01T01:00:00Z");
    let late = hourly.decide(slot, slot + Duration::minutes(30));
    assert!(late.fire.is_empty());
    assert_eq!(late.next, Some(utc("2026-01-01T02:00:00Z")));
}

#[test]
fn far_behind_schedules_decide_in_bounded_work() {
    let every_second = with(ScheduleFields {
        cron: Some("* * * * * *".into()),
        timezone: "Europe/Paris".into(),
        missed: Missed::All,
        max_catch_up: 100,
        ..ScheduleFields::default()
    })
    .unwrap();
    let next = utc("2026-01-01T00:00:00Z");
    let now = utc("2026-03-01T00:00:00.5Z");
    let slots = every_second.decide(next, now);
    // The 60 slots of the last minute are late (they fire), and the 100 before them are the
    // catch-up.
    assert_eq!(slots.fire.len(), 160);
    assert_eq!(slots.fire[0], utc("2026-02-28T23:57:21Z"));
    assert_eq!(slots.fire[100], utc("2026-02-28T23:59:01Z"));
    assert_eq!(*slots.fire.last().unwrap(), utc("2026-03-01T00:00:00Z"));
    assert_eq!(slots.next, Some(utc("2026-03-01T00:00:01Z")));

    let interval_all = missed(Missed::All, 3).decide(next, now);
    assert_eq!(
        interval_all.fire,
        [
            "2026-02-28T23:58:40Z",
            "2026-02-28T23:58:50Z",
            "2026-02-28T23:59:00Z",
            "2026-02-28T23:59:10Z",
            "2026-02-28T23:59:20Z",
            "2026-02-28T23:59:30Z",
            "2026-02-28T23:59:40Z",
            "2026-02-28T23:59:50Z",
            "2026-03-01T00:00:00Z"
        ]
        .map(utc)
    );
}

#[test]
fn ended_schedules_have_no_next_slot() {
    let spec = with(ScheduleFields {
        end_at: Some(utc("2026-01-01T00:00:25Z")),
        ..interval(10)
    })
    .unwrap();
    let slots = spec.decide(utc("2026-01-01T00:00:20Z"), utc("2026-01-01T00:05:00Z"));
    assert_eq!(slots.fire, vec![utc("2026-01-01T00:00:20Z")]);
    assert_eq!(slots.next, None);
}

#[test]
fn slots_do_not_depend_on_where_counting_starts_in_a_repeated_pass() {
    // Created (or edited) during the repeated pass of a fall-back: its wall-clock times are
    // not slots, so the next slot is the first after the pass, as when counting from before.
    let spec = cron("*/30 * * * *", "Europe/Paris");
    assert_eq!(
        upcoming(&spec, "2026-10-25T02:10:00+01:00", 2),
        vec![
            utc("2026-10-25T03:00:00+01:00"),
            utc("2026-10-25T03:30:00+01:00")
        ]
    );
    let hourly = cron("0 * * * *", "America/New_York");
    assert_eq!(
        upcoming(&hourly, "2026-11-01T01:20:00-05:00", 1),
        vec![utc("2026-11-01T02:00:00-05:00")]
    );
}

#[test]
fn a_resumed_schedule_treats_every_slot_passed_while_paused_as_missed() {
    // Every 10 s; paused with next slot 00:00:10, resumed at 00:00:45: 00:00:10 … 00:00:40
    // passed while paused (all within the 60 s grace, yet missed).
    let next = utc("2026-01-01T00:00:10Z");
    let now = utc("2026-01-01T00:00:45Z");
    assert_eq!(
        missed(Missed::None, 100).on_resume(next, now),
        Some(utc("2026-01-01T00:00:50Z"))
    );
    assert_eq!(
        missed(Missed::Last, 100).on_resume(next, now),
        Some(utc("2026-01-01T00:00:40Z"))
    );
    assert_eq!(
        missed(Missed::All, 2).on_resume(next, now),
        Some(utc("2026-01-01T00:00:30Z"))
    );
    assert_eq!(missed(Missed::All, 100).on_resume(next, now), Some(next));
    // Nothing passed: unchanged.
    assert_eq!(
        missed(Missed::Last, 100).on_resume(next, next - Duration::seconds(1)),
        Some(next)
    );
}
