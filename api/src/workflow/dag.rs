//! The rules of a workflow's graph, as pure functions (no database, no clock): which steps
//! exist and what they need, cycle detection, ancestors, which pending step can be decided
//! now (started or skipped, and why), how a run ends, and what `retry` runs again.
//!
//! The engine (`super::engine`) calls these under the run's lock with the steps' stored
//! states; everything that decides *what happens next* lives here and is unit-tested below.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::model::FieldError;
use crate::model::workflow::{NewWorkflow, RunStatus, SkipReason, StepStatus, When};

/// Most steps a workflow may have.
pub const MAX_STEPS: usize = 500;
/// Longest step id.
pub const MAX_STEP_ID: usize = 64;

/// Checks step ids and `needs`, and that the graph has no cycle. Returns the steps' indexes in
/// a topological order (every step after all it needs).
pub fn check_graph(def: &NewWorkflow) -> Result<Vec<usize>, FieldError> {
    if def.steps.is_empty() {
        return Err(FieldError::new(
            "steps",
            "a workflow needs at least one step",
        ));
    }
    if def.steps.len() > MAX_STEPS {
        return Err(FieldError::new(
            "steps",
            format!("at most {MAX_STEPS} steps"),
        ));
    }
    let mut index = BTreeMap::new();
    for (i, step) in def.steps.iter().enumerate() {
        check_step_id(&format!("steps[{i}].id"), &step.id)?;
        if index.insert(step.id.as_str(), i).is_some() {
            return Err(FieldError::new(
                format!("steps[{i}].id"),
                format!("step id {:?} is used twice", step.id),
            ));
        }
    }
    let mut indegree = vec![0usize; def.steps.len()];
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); def.steps.len()];
    for (i, step) in def.steps.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (n, need) in step.needs.iter().enumerate() {
            let field = format!("steps[{i}].needs[{n}]");
            let Some(&j) = index.get(need.as_str()) else {
                return Err(FieldError::new(
                    field,
                    format!("step {:?} needs unknown step {need:?}", step.id),
                ));
            };
            if j == i {
                return Err(FieldError::new(
                    field,
                    format!("step {:?} needs itself", step.id),
                ));
            }
            if !seen.insert(j) {
                return Err(FieldError::new(
                    field,
                    format!("step {:?} needs {need:?} twice", step.id),
                ));
            }
            indegree[i] += 1;
            dependants[j].push(i);
        }
    }
    // Kahn: whatever is left with needs after the walk is on (or behind) a cycle.
    let mut ready: VecDeque<usize> = (0..def.steps.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(def.steps.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependants[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    if order.len() < def.steps.len() {
        let cycle = find_cycle(def, &index, &indegree);
        let first = cycle.first().copied().unwrap_or(0);
        let names: Vec<&str> = cycle.iter().map(|&i| def.steps[i].id.as_str()).collect();
        return Err(FieldError::new(
            format!("steps[{first}].needs"),
            format!("the steps' needs form a cycle: {}", names.join(" → ")),
        ));
    }
    Ok(order)
}

/// A cycle among the steps Kahn's walk could not order, as step indexes (first repeated last).
fn find_cycle(def: &NewWorkflow, index: &BTreeMap<&str, usize>, left: &[usize]) -> Vec<usize> {
    // Every step left has a need that is also left; following such needs must revisit a step.
    let Some(start) = (0..left.len()).find(|&i| left[i] > 0) else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut on_path = BTreeMap::from([(start, 0usize)]);
    let mut at = start;
    loop {
        let next = def.steps[at]
            .needs
            .iter()
            .filter_map(|n| index.get(n.as_str()).copied())
            .find(|&j| left[j] > 0);
        let Some(next) = next else {
            return path;
        };
        if let Some(&pos) = on_path.get(&next) {
            let mut cycle: Vec<usize> = path[pos..].to_vec();
            cycle.reverse(); // needs point backwards: show the run order
            // Start at the step defined first, so the answer does not depend on the walk.
            if let Some(first) = (0..cycle.len()).min_by_key(|&i| cycle[i]) {
                cycle.rotate_left(first);
            }
            cycle.push(cycle[0]);
            return cycle;
        }
        on_path.insert(next, path.len());
        path.push(next);
        at = next;
    }
}

/// A step id: a letter, then letters, digits or `_` — so `steps.<id>` is valid CEL.
pub fn check_step_id(field: &str, id: &str) -> Result<(), FieldError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(FieldError::new(
            field,
            format!("step id {id:?} must start with a letter and hold only letters, digits and _"),
        ));
    }
    if id.len() > MAX_STEP_ID {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_STEP_ID} characters"),
        ));
    }
    Ok(())
}

/// Every step's ancestors (what it needs, transitively). `def` must have passed
/// [`check_graph`].
pub fn ancestors(def: &NewWorkflow) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let order = check_graph(def).unwrap_or_default();
    for i in order {
        let step = &def.steps[i];
        let mut set = BTreeSet::new();
        for need in &step.needs {
            set.insert(need.clone());
            if let Some(theirs) = out.get(need) {
                set.extend(theirs.iter().cloned());
            }
        }
        out.insert(step.id.clone(), set);
    }
    out
}

/// What the engine knows of a step when deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepView {
    pub status: StepStatus,
    pub skip_reason: Option<SkipReason>,
}

impl StepView {
    pub const PENDING: Self = Self {
        status: StepStatus::Pending,
        skip_reason: None,
    };

    pub fn new(status: StepStatus, skip_reason: Option<SkipReason>) -> Self {
        Self {
            status,
            skip_reason,
        }
    }
}

/// The next thing to do with a pending step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Its needs allow it: evaluate its `if`, then start it.
    Start,
    Skip(SkipReason),
}

/// How a need ended, as its dependants see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NeedEnd {
    Ok,
    Failed,
    Skipped,
}

fn need_end(view: StepView, continue_on_error: bool) -> NeedEnd {
    match view.status {
        StepStatus::Succeeded => NeedEnd::Ok,
        StepStatus::Failed if continue_on_error => NeedEnd::Ok,
        StepStatus::Failed | StepStatus::Cancelled => NeedEnd::Failed,
        StepStatus::Skipped if view.skip_reason.is_some_and(SkipReason::is_failure) => {
            NeedEnd::Failed
        }
        StepStatus::Skipped | StepStatus::Pending | StepStatus::Running => NeedEnd::Skipped,
    }
}

/// Whether a step's own failure counts against the run (and `stop_on_error`).
fn counts_as_failure(view: StepView, continue_on_error: bool) -> bool {
    match view.status {
        StepStatus::Failed => !continue_on_error,
        StepStatus::Cancelled => true,
        _ => false,
    }
}

/// The pending steps that can be decided now, in definition order. A step is decided once
/// all its needs ended; `stop_on_error` decides `all_succeeded` steps at once after a failure.
/// Steps missing from `states` count as pending.
pub fn next_moves(def: &NewWorkflow, states: &BTreeMap<String, StepView>) -> Vec<(String, Move)> {
    let view = |id: &str| states.get(id).copied().unwrap_or(StepView::PENDING);
    let coe: BTreeMap<&str, bool> = def
        .steps
        .iter()
        .map(|s| (s.id.as_str(), s.continue_on_error))
        .collect();
    let stopping = def.stop_on_error
        && def
            .steps
            .iter()
            .any(|s| counts_as_failure(view(&s.id), s.continue_on_error));
    let mut moves = Vec::new();
    for step in &def.steps {
        if view(&step.id).status != StepStatus::Pending {
            continue;
        }
        if stopping && step.when == When::AllSucceeded {
            moves.push((step.id.clone(), Move::Skip(SkipReason::StopOnError)));
            continue;
        }
        let needs: Vec<StepView> = step.needs.iter().map(|n| view(n)).collect();
        if needs.iter().any(|v| !v.status.is_terminal()) {
            continue;
        }
        let ends: Vec<NeedEnd> = step
            .needs
            .iter()
            .zip(&needs)
            .map(|(n, v)| need_end(*v, coe.get(n.as_str()).copied().unwrap_or(false)))
            .collect();
        let any_failed = ends.contains(&NeedEnd::Failed);
        let any_skipped = ends.contains(&NeedEnd::Skipped);
        let verdict = match step.when {
            When::Always => Move::Start,
            When::AnyFailed if any_failed => Move::Start,
            When::AnyFailed => Move::Skip(SkipReason::When),
            When::AllSucceeded if any_failed => Move::Skip(SkipReason::UpstreamFailed),
            When::AllSucceeded if any_skipped => Move::Skip(SkipReason::UpstreamSkipped),
            When::AllSucceeded => Move::Start,
        };
        moves.push((step.id.clone(), verdict));
    }
    moves
}

/// How the run ends, once every step has: `failed` if a step failed (without
/// `continue_on_error`) or was cancelled, else `succeeded`. `None` while a step is pending or
/// running.
pub fn run_outcome(def: &NewWorkflow, states: &BTreeMap<String, StepView>) -> Option<RunStatus> {
    let view = |id: &str| states.get(id).copied().unwrap_or(StepView::PENDING);
    if def.steps.iter().any(|s| !view(&s.id).status.is_terminal()) {
        return None;
    }
    let failed = def
        .steps
        .iter()
        .any(|s| counts_as_failure(view(&s.id), s.continue_on_error));
    Some(if failed {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    })
}

/// The steps `retry` runs again: failed and cancelled ones, and those skipped because of a
/// failure. Succeeded steps keep their outputs; steps skipped by their `if` or `when` stay.
pub fn retry_targets(def: &NewWorkflow, states: &BTreeMap<String, StepView>) -> Vec<String> {
    def.steps
        .iter()
        .filter(|s| {
            let v = states.get(&s.id).copied().unwrap_or(StepView::PENDING);
            match v.status {
                StepStatus::Failed | StepStatus::Cancelled => true,
                StepStatus::Skipped => v.skip_reason.is_some_and(SkipReason::is_failure),
                _ => false,
            }
        })
        .map(|s| s.id.clone())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests;
