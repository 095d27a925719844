use super::*;
use crate::model::workflow::StepSpec;
use serde_json::json;

fn def(steps: serde_json::Value) -> NewWorkflow {
    serde_json::from_value(json!({"name": "w", "steps": steps})).expect("definition")
}

fn step(id: &str, needs: &[&str]) -> serde_json::Value {
    json!({"id": id, "event_id": "00000000-0000-0000-0000-000000000001", "needs": needs})
}

fn states(pairs: &[(&str, StepStatus, Option<SkipReason>)]) -> BTreeMap<String, StepView> {
    pairs
        .iter()
        .map(|(id, s, r)| ((*id).to_owned(), StepView::new(*s, *r)))
        .collect()
}

use StepStatus::{Cancelled, Failed, Pending, Running, Skipped, Succeeded};

#[test]
fn a_diamond_orders_and_has_ancestors() {
    let d = def(json!([
        step("d", &["b", "c"]),
        step("b", &["a"]),
        step("c", &["a"]),
        step("a", &[])
    ]));
    let order = check_graph(&d).expect("valid");
    let pos = |id: &str| {
        order
            .iter()
            .position(|&i| d.steps[i].id == id)
            .expect("ordered")
    };
    assert!(pos("a") < pos("b") && pos("a") < pos("c"));
    assert!(pos("b") < pos("d") && pos("c") < pos("d"));
    let anc = ancestors(&d);
    assert_eq!(
        anc["d"].iter().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(anc["a"].is_empty());
}

#[test]
fn graph_errors_name_the_step_and_field() {
    let unknown = check_graph(&def(json!([step("a", &["zz"])]))).unwrap_err();
    assert_eq!(unknown.field, "steps[0].needs[0]");
    assert!(unknown.message.contains("\"zz\""), "{}", unknown.message);

    let dup = check_graph(&def(json!([step("a", &[]), step("a", &[])]))).unwrap_err();
    assert_eq!(dup.field, "steps[1].id");

    let itself = check_graph(&def(json!([step("a", &["a"])]))).unwrap_err();
    assert_eq!(itself.field, "steps[0].needs[0]");

    let twice = check_graph(&def(json!([step("a", &[]), step("b", &["a", "a"])]))).unwrap_err();
    assert_eq!(twice.field, "steps[1].needs[1]");

    let bad_id = check_graph(&def(json!([step("no-dash", &[])]))).unwrap_err();
    assert_eq!(bad_id.field, "steps[0].id");
    let digit = check_graph(&def(json!([step("1a", &[])]))).unwrap_err();
    assert_eq!(digit.field, "steps[0].id");

    assert_eq!(check_graph(&def(json!([]))).unwrap_err().field, "steps");
}

#[test]
fn a_cycle_is_found_and_shown_in_run_order() {
    let d = def(json!([
        step("start", &[]),
        step("a", &["start", "c"]),
        step("b", &["a"]),
        step("c", &["b"]),
        step("tail", &["c"])
    ]));
    let err = check_graph(&d).unwrap_err();
    assert!(err.message.contains("cycle"), "{}", err.message);
    for id in ["a", "b", "c"] {
        assert!(err.message.contains(id), "{}", err.message);
    }
    assert!(!err.message.contains("start"), "{}", err.message);
    assert!(err.field.starts_with("steps[") && err.field.ends_with("].needs"));
}

#[test]
fn roots_start_and_a_fan_in_waits_for_every_parent() {
    let d = def(json!([
        step("a", &[]),
        step("b", &["a"]),
        step("c", &["a"]),
        step("d", &["b", "c"])
    ]));
    assert_eq!(
        next_moves(&d, &BTreeMap::new()),
        [("a".to_owned(), Move::Start)]
    );
    let s = states(&[
        ("a", Succeeded, None),
        ("b", Succeeded, None),
        ("c", Running, None),
    ]);
    assert!(next_moves(&d, &s).is_empty(), "d waits for c");
    let s = states(&[
        ("a", Succeeded, None),
        ("b", Succeeded, None),
        ("c", Succeeded, None),
    ]);
    assert_eq!(next_moves(&d, &s), [("d".to_owned(), Move::Start)]);
    let s = states(&[
        ("a", Succeeded, None),
        ("b", Succeeded, None),
        ("c", Succeeded, None),
        ("d", Running, None),
    ]);
    assert!(
        next_moves(&d, &s).is_empty(),
        "a started step is not decided again"
    );
}

#[test]
fn failures_and_skips_propagate_by_when() {
    let mut d = def(json!([
        step("a", &[]),
        step("b", &["a"]),
        step("alert", &["a", "b"]),
        step("cleanup", &["a"])
    ]));
    d.steps[2].when = When::AnyFailed;
    d.steps[3].when = When::Always;
    let s = states(&[("a", Failed, None)]);
    assert_eq!(
        next_moves(&d, &s),
        [
            ("b".to_owned(), Move::Skip(SkipReason::UpstreamFailed)),
            ("cleanup".to_owned(), Move::Start)
        ]
    );
    let s = states(&[
        ("a", Failed, None),
        ("b", Skipped, Some(SkipReason::UpstreamFailed)),
    ]);
    assert_eq!(next_moves(&d, &s)[0], ("alert".to_owned(), Move::Start));
    // Nothing failed: the any_failed step is skipped (not a failure), always runs.
    let s = states(&[("a", Succeeded, None), ("b", Succeeded, None)]);
    assert_eq!(
        next_moves(&d, &s),
        [
            ("alert".to_owned(), Move::Skip(SkipReason::When)),
            ("cleanup".to_owned(), Move::Start)
        ]
    );
    // A step skipped by its `if` skips its all_succeeded dependants, not as a failure.
    let s = states(&[("a", Skipped, Some(SkipReason::Condition))]);
    assert_eq!(
        next_moves(&d, &s)[0],
        ("b".to_owned(), Move::Skip(SkipReason::UpstreamSkipped))
    );
    // Cancelled counts as failed.
    let s = states(&[("a", Cancelled, None)]);
    assert_eq!(
        next_moves(&d, &s)[0],
        ("b".to_owned(), Move::Skip(SkipReason::UpstreamFailed))
    );
}

#[test]
fn continue_on_error_lets_dependants_run_but_any_failed_still_sees_it() {
    let mut d = def(json!([
        step("backup", &[]),
        step("verify", &["backup"]),
        step("alert", &["backup", "verify"])
    ]));
    d.steps[0].continue_on_error = true;
    d.steps[2].when = When::AnyFailed;
    let s = states(&[("backup", Failed, None)]);
    assert_eq!(next_moves(&d, &s), [("verify".to_owned(), Move::Start)]);
    let s = states(&[("backup", Failed, None), ("verify", Succeeded, None)]);
    assert_eq!(
        next_moves(&d, &s),
        [("alert".to_owned(), Move::Skip(SkipReason::When))]
    );
    let s = states(&[
        ("backup", Failed, None),
        ("verify", Succeeded, None),
        ("alert", Skipped, Some(SkipReason::When)),
    ]);
    assert_eq!(
        run_outcome(&d, &s),
        Some(RunStatus::Succeeded),
        "continue_on_error"
    );
}

#[test]
fn stop_on_error_skips_independent_steps_but_not_handlers() {
    let mut d = def(json!([
        step("one", &[]),
        step("two", &[]),
        step("after_two", &["two"]),
        step("handler", &["one"])
    ]));
    d.stop_on_error = true;
    d.steps[3].when = When::AnyFailed;
    let s = states(&[("one", Failed, None), ("two", Running, None)]);
    assert_eq!(
        next_moves(&d, &s),
        [
            ("after_two".to_owned(), Move::Skip(SkipReason::StopOnError)),
            ("handler".to_owned(), Move::Start)
        ]
    );
    d.stop_on_error = false;
    assert_eq!(next_moves(&d, &s), [("handler".to_owned(), Move::Start)]);
}

#[test]
fn a_linear_chain_with_stop_on_error_is_a_serial_plan() {
    let mut d = def(json!([
        step("s1", &[]),
        step("s2", &["s1"]),
        step("s3", &["s2"])
    ]));
    d.stop_on_error = true;
    let s = states(&[("s1", Succeeded, None), ("s2", Failed, None)]);
    assert_eq!(
        next_moves(&d, &s),
        [("s3".to_owned(), Move::Skip(SkipReason::StopOnError))]
    );
}

#[test]
fn the_run_ends_when_every_step_has() {
    let d = def(json!([step("a", &[]), step("b", &["a"])]));
    assert_eq!(run_outcome(&d, &states(&[("a", Succeeded, None)])), None);
    assert_eq!(
        run_outcome(
            &d,
            &states(&[("a", Succeeded, None), ("b", Succeeded, None)])
        ),
        Some(RunStatus::Succeeded)
    );
    assert_eq!(
        run_outcome(
            &d,
            &states(&[
                ("a", Failed, None),
                ("b", Skipped, Some(SkipReason::UpstreamFailed))
            ])
        ),
        Some(RunStatus::Failed)
    );
    assert_eq!(
        run_outcome(
            &d,
            &states(&[
                ("a", Skipped, Some(SkipReason::Condition)),
                ("b", Skipped, Some(SkipReason::UpstreamSkipped))
            ])
        ),
        Some(RunStatus::Succeeded),
        "skipping by condition is not a failure"
    );
    assert_eq!(run_outcome(&d, &states(&[("a", Pending, None)])), None);
}

#[test]
fn retry_targets_failed_and_failure_skipped_steps_only() {
    let d = def(json!([
        step("ok", &[]),
        step("bad", &[]),
        step("after_bad", &["bad"]),
        step("maybe", &[]),
        step("after_maybe", &["maybe"]),
        step("gone", &[])
    ]));
    let s = states(&[
        ("ok", Succeeded, None),
        ("bad", Failed, None),
        ("after_bad", Skipped, Some(SkipReason::UpstreamFailed)),
        ("maybe", Skipped, Some(SkipReason::Condition)),
        ("after_maybe", Skipped, Some(SkipReason::UpstreamSkipped)),
        ("gone", Cancelled, None),
    ]);
    assert_eq!(retry_targets(&d, &s), ["bad", "after_bad", "gone"]);
}

#[test]
fn step_specs_parse_if_and_when() {
    let s: StepSpec = serde_json::from_value(json!({
        "id": "x", "event_id": "00000000-0000-0000-0000-000000000001",
        "if": "input.go", "when": "any_failed"
    }))
    .expect("parses");
    assert_eq!(s.if_.as_deref(), Some("input.go"));
    assert_eq!(s.when, When::AnyFailed);
    let bad = serde_json::from_value::<StepSpec>(json!({
        "id": "x", "event_id": "00000000-0000-0000-0000-000000000001", "when": "sometimes"
    }));
    assert!(bad.is_err());
}
