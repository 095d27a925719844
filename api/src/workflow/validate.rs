//! Checks a workflow definition before it is stored: names, the graph (`super::dag`), and every
//! expression — it must compile, use only the variables its place offers, and name only steps
//! that are ancestors of its step (whose outputs exist by the time it is evaluated). Every
//! error names the step and field (`steps[2].if`).

use std::collections::BTreeSet;

use crate::model::FieldError;
use crate::model::workflow::{NewWorkflow, StepSpec};

use super::{dag, expr};

/// Most elements a `max_parallel` may allow.
pub const MAX_PARALLEL: i32 = 1000;

pub fn validate(def: &NewWorkflow) -> Result<(), FieldError> {
    let name = def.name.trim();
    if name.is_empty() || def.name.len() > 200 || def.name.chars().any(char::is_control) {
        return Err(FieldError::new(
            "name",
            "must be 1-200 characters, without control characters",
        ));
    }
    if def.description.len() > 10_000 {
        return Err(FieldError::new(
            "description",
            "must be at most 10000 bytes",
        ));
    }
    dag::check_graph(def)?;
    let ancestors = dag::ancestors(def);
    for (i, step) in def.steps.iter().enumerate() {
        let mine = ancestors.get(&step.id).cloned().unwrap_or_default();
        check_step(i, step, &mine)?;
    }
    Ok(())
}

fn check_step(i: usize, step: &StepSpec, ancestors: &BTreeSet<String>) -> Result<(), FieldError> {
    let at = |field: &str| format!("steps[{i}].{field}");
    let base: &[&str] = &["input", "steps"];
    if let Some(source) = &step.if_ {
        check_expression(&at("if"), &step.id, source, base, ancestors)?;
    }
    if let Some(source) = &step.for_each {
        check_expression(&at("for_each"), &step.id, source, base, ancestors)?;
    }
    if let Some(mapping) = &step.input {
        let offered: &[&str] = if step.for_each.is_some() {
            &["input", "steps", "item", "index"]
        } else {
            base
        };
        for (key, value) in mapping {
            if let Some(source) = value.as_str() {
                check_expression(
                    &at(&format!("input.{key}")),
                    &step.id,
                    source,
                    offered,
                    ancestors,
                )?;
            }
        }
    }
    match (step.max_parallel, &step.for_each) {
        (Some(_), None) => {
            return Err(FieldError::new(
                at("max_parallel"),
                "only a for_each step runs in parallel",
            ));
        }
        (Some(n), Some(_)) if !(1..=MAX_PARALLEL).contains(&n) => {
            return Err(FieldError::new(
                at("max_parallel"),
                format!("must be 1 to {MAX_PARALLEL}"),
            ));
        }
        _ => {}
    }
    if let Some(retry) = &step.retry {
        if let Some(n) = retry.max_attempts
            && !(1..=100).contains(&n)
        {
            return Err(FieldError::new(
                at("retry.max_attempts"),
                "must be 1 to 100",
            ));
        }
        for (field, value) in [
            ("retry.backoff_seconds", retry.backoff_seconds),
            ("retry.backoff_max_seconds", retry.backoff_max_seconds),
        ] {
            if let Some(n) = value
                && !(0..=86_400).contains(&n)
            {
                return Err(FieldError::new(at(field), "must be 0 to 86400"));
            }
        }
    }
    Ok(())
}

fn check_expression(
    field: &str,
    step: &str,
    source: &str,
    offered: &[&str],
    ancestors: &BTreeSet<String>,
) -> Result<(), FieldError> {
    let compiled =
        expr::compile(source).map_err(|e| FieldError::new(field, format!("step {step:?}: {e}")))?;
    if let Some(unknown) = compiled
        .references
        .variables
        .iter()
        .find(|v| !offered.contains(&v.as_str()))
    {
        return Err(FieldError::new(
            field,
            format!(
                "step {step:?}: unknown variable {unknown:?} (available here: {})",
                offered.join(", ")
            ),
        ));
    }
    if let Some(other) = compiled
        .references
        .steps
        .iter()
        .find(|s| !ancestors.contains(s.as_str()))
    {
        return Err(FieldError::new(
            field,
            format!(
                "step {step:?} refers to steps.{other}, which is not one of its ancestors \
                 (add it to needs, directly or through another step)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use serde_json::json;

    fn def(steps: serde_json::Value) -> NewWorkflow {
        serde_json::from_value(json!({"name": "nightly-backup", "steps": steps})).expect("shape")
    }
    const E: &str = "00000000-0000-0000-0000-000000000001";

    #[test]
    fn the_issue_example_is_valid() {
        let d = def(json!([
            {"id": "hosts", "event_id": E},
            {"id": "backup", "event_id": E, "needs": ["hosts"],
             "for_each": "steps.hosts.output.hosts", "max_parallel": 5, "continue_on_error": true},
            {"id": "verify", "event_id": E, "needs": ["backup"],
             "if": "steps.backup.output.all(r, r.size > 0)",
             "input": {"count": "size(steps.backup.output)", "fixed": 3}},
            {"id": "alert", "event_id": E, "needs": ["backup", "verify"], "when": "any_failed"}
        ]));
        validate(&d).expect("valid");
    }

    #[test]
    fn expression_errors_name_step_and_field() {
        let bad = def(json!([
            {"id": "a", "event_id": E},
            {"id": "b", "event_id": E, "needs": ["a"], "if": "steps.a.output.ok &&"}
        ]));
        let e = validate(&bad).unwrap_err();
        assert_eq!(e.field, "steps[1].if");
        assert!(e.message.contains("\"b\""), "{}", e.message);

        let not_ancestor = def(json!([
            {"id": "a", "event_id": E},
            {"id": "b", "event_id": E},
            {"id": "c", "event_id": E, "needs": ["a"], "input": {"x": "steps.b.output"}}
        ]));
        let e = validate(&not_ancestor).unwrap_err();
        assert_eq!(e.field, "steps[2].input.x");
        assert!(e.message.contains("steps.b"), "{}", e.message);

        // A grand-parent is an ancestor.
        let grand = def(json!([
            {"id": "a", "event_id": E},
            {"id": "b", "event_id": E, "needs": ["a"]},
            {"id": "c", "event_id": E, "needs": ["b"], "if": "steps.a.status == 'succeeded'"}
        ]));
        validate(&grand).expect("grand-parents are ancestors");

        let unknown_var = def(json!([{"id": "a", "event_id": E, "if": "item > 1"}]));
        let e = validate(&unknown_var).unwrap_err();
        assert_eq!(e.field, "steps[0].if");
        assert!(e.message.contains("\"item\""), "{}", e.message);

        let item_ok = def(json!([{"id": "a", "event_id": E, "for_each": "input.list",
                                  "input": {"host": "item", "n": "index + 1"}}]));
        validate(&item_ok).expect("item and index in a for_each mapping");

        let parallel = def(json!([{"id": "a", "event_id": E, "max_parallel": 3}]));
        assert_eq!(
            validate(&parallel).unwrap_err().field,
            "steps[0].max_parallel"
        );
        let zero =
            def(json!([{"id": "a", "event_id": E, "for_each": "input.l", "max_parallel": 0}]));
        assert_eq!(validate(&zero).unwrap_err().field, "steps[0].max_parallel");
        let retry = def(json!([{"id": "a", "event_id": E, "retry": {"max_attempts": 0}}]));
        assert_eq!(
            validate(&retry).unwrap_err().field,
            "steps[0].retry.max_attempts"
        );
        let self_ref = def(json!([{"id": "a", "event_id": E, "if": "steps.a.status == 'x'"}]));
        assert_eq!(validate(&self_ref).unwrap_err().field, "steps[0].if");
    }

    #[test]
    fn names_are_checked() {
        let mut d = def(json!([{"id": "a", "event_id": E}]));
        d.name = " ".into();
        assert_eq!(validate(&d).unwrap_err().field, "name");
    }
}
