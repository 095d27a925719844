//! CEL expressions of workflows (`if`, `input` mappings, `for_each`) and of conditional
//! actions: compiling with the names an expression refers to, and evaluating over JSON.
//!
//! Pure: no database, no clock. Variables are JSON values (`input`, `steps`, `item`, `index`,
//! `output`, `status`…); results come back as JSON.

use std::collections::BTreeSet;

use cel_interpreter::{Context, Program};
use cel_parser::ast::{EntryExpr, Expr};
use cel_parser::reference::Val;
use serde_json::Value;

/// Longest expression accepted.
pub const MAX_EXPRESSION: usize = 4096;

/// What an expression refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Free variables (not the names a macro such as `all(r, …)` binds).
    pub variables: BTreeSet<String>,
    /// Step ids named as `steps.<id>` or `steps["<id>"]`.
    pub steps: BTreeSet<String>,
}

/// An expression that parsed.
#[derive(Debug)]
pub struct Compiled {
    program: Program,
    pub references: References,
}

/// Parses `source`; the error says what is wrong (for a 422 naming the field).
pub fn compile(source: &str) -> Result<Compiled, String> {
    if source.trim().is_empty() {
        return Err("the expression is empty".into());
    }
    if source.len() > MAX_EXPRESSION {
        return Err(format!("at most {MAX_EXPRESSION} bytes"));
    }
    // The parser is a generated one: never let a malformed expression take the replica down.
    let parsed = std::panic::catch_unwind(|| {
        let tree = cel_parser::Parser::new().parse(source);
        let program = Program::compile(source);
        (tree, program)
    })
    .map_err(|_| "does not compile: the expression is malformed".to_owned())?;
    let (tree, program) = match parsed {
        (Ok(tree), Ok(program)) => (tree, program),
        (Err(e), _) | (_, Err(e)) => return Err(format!("does not compile: {}", one_line(&e))),
    };
    let mut references = References::default();
    let mut bound = Vec::new();
    walk(&tree.expr, &mut bound, &mut references)?;
    Ok(Compiled {
        program,
        references,
    })
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Collects free variables and step references; refuses `steps` used other than as
/// `steps.<id>…` or `steps["<id>"]…` (the step must be known to check it is an ancestor).
fn walk(expr: &Expr, bound: &mut Vec<String>, refs: &mut References) -> Result<(), String> {
    let free = |name: &str, bound: &[String]| !bound.iter().any(|b| b == name);
    match expr {
        Expr::Unspecified | Expr::Literal(_) => Ok(()),
        Expr::Ident(name) => {
            if name.starts_with('@') || !free(name, bound) {
                return Ok(());
            }
            if name == "steps" {
                return Err("`steps` must be followed by a step id: steps.<id>.output".into());
            }
            refs.variables.insert(name.clone());
            Ok(())
        }
        Expr::Select(select) => {
            if let Expr::Ident(name) = &select.operand.expr
                && name == "steps"
                && free(name, bound)
            {
                refs.variables.insert("steps".into());
                refs.steps.insert(select.field.clone());
                return Ok(());
            }
            walk(&select.operand.expr, bound, refs)
        }
        Expr::Call(call) => {
            if call.func_name == "_[_]"
                && let [target, key] = call.args.as_slice()
                && let Expr::Ident(name) = &target.expr
                && name == "steps"
                && free(name, bound)
            {
                let Expr::Literal(Val::String(id)) = &key.expr else {
                    return Err("steps[...] needs a literal step id: steps[\"<id>\"]".into());
                };
                refs.variables.insert("steps".into());
                refs.steps.insert(id.clone());
                return Ok(());
            }
            if let Some(target) = &call.target {
                walk(&target.expr, bound, refs)?;
            }
            for arg in &call.args {
                walk(&arg.expr, bound, refs)?;
            }
            Ok(())
        }
        Expr::Comprehension(c) => {
            walk(&c.iter_range.expr, bound, refs)?;
            walk(&c.accu_init.expr, bound, refs)?;
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            let inner = walk(&c.loop_cond.expr, bound, refs)
                .and_then(|()| walk(&c.loop_step.expr, bound, refs))
                .and_then(|()| walk(&c.result.expr, bound, refs));
            bound.truncate(depth);
            inner
        }
        Expr::List(list) => list
            .elements
            .iter()
            .try_for_each(|e| walk(&e.expr, bound, refs)),
        Expr::Map(map) => map
            .entries
            .iter()
            .try_for_each(|entry| entry_walk(&entry.expr, bound, refs)),
        Expr::Struct(s) => s
            .entries
            .iter()
            .try_for_each(|entry| entry_walk(&entry.expr, bound, refs)),
    }
}

fn entry_walk(
    entry: &EntryExpr,
    bound: &mut Vec<String>,
    refs: &mut References,
) -> Result<(), String> {
    match entry {
        EntryExpr::StructField(f) => walk(&f.value.expr, bound, refs),
        EntryExpr::MapEntry(m) => {
            walk(&m.key.expr, bound, refs)?;
            walk(&m.value.expr, bound, refs)
        }
    }
}

impl Compiled {
    /// Evaluates over `vars` (name → JSON value) to JSON.
    pub fn eval(&self, vars: &[(&str, &Value)]) -> Result<Value, String> {
        let mut ctx = Context::default();
        for (name, value) in vars {
            ctx.add_variable(*name, *value)
                .map_err(|e| format!("variable {name}: {e}"))?;
        }
        let value =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.program.execute(&ctx)))
                .map_err(|_| "the expression could not be evaluated".to_owned())?
                .map_err(|e| one_line(&e))?;
        value
            .json()
            .map_err(|e| format!("the result is not JSON: {}", one_line(&e)))
    }

    /// Evaluates to a boolean; anything else is an error naming what came out.
    pub fn eval_bool(&self, vars: &[(&str, &Value)]) -> Result<bool, String> {
        match self.eval(vars)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!("must be true or false, got {}", short(&other))),
        }
    }
}

/// A value shortened for an error message.
pub fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 120 {
        let cut = (0..=117)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &text[..cut])
    } else {
        text
    }
}

/// Compiles and evaluates in one go (for expressions already validated at creation).
pub fn eval(source: &str, vars: &[(&str, &Value)]) -> Result<Value, String> {
    compile(source)?.eval(vars)
}

/// [`eval`] to a boolean.
pub fn eval_bool(source: &str, vars: &[(&str, &Value)]) -> Result<bool, String> {
    compile(source)?.eval_bool(vars)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_name_steps_and_free_variables_but_not_macro_bindings() {
        let c = compile("steps.backup.output.all(r, r.size > 0) && input.go").expect("compiles");
        assert_eq!(c.references.steps, BTreeSet::from(["backup".to_owned()]));
        assert_eq!(
            c.references.variables,
            BTreeSet::from(["input".to_owned(), "steps".to_owned()])
        );
        let c = compile("size(steps[\"a\"].output) + size(steps.b.output)").expect("compiles");
        assert_eq!(
            c.references.steps,
            BTreeSet::from(["a".to_owned(), "b".to_owned()])
        );
        assert!(compile("steps[input.which].output").is_err());
        assert!(compile("size(steps)").is_err());
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(compile("").unwrap_err().contains("empty"));
        assert!(compile("1 +").unwrap_err().contains("does not compile"));
        assert!(compile(&"1+".repeat(3000)).unwrap_err().contains("at most"));
        for nasty in [
            "((((",
            "'unterminated",
            "a.b(",
            "[1, 2",
            "{1: }",
            "x ? y",
            "\u{0}",
        ] {
            assert!(compile(nasty).is_err(), "{nasty:?}");
        }
    }

    #[test]
    fn evaluation_over_json() {
        let steps =
            json!({"backup": {"status": "succeeded", "output": [{"size": 3}, {"size": 1}]}});
        let input = json!({"go": true, "hosts": ["a", "b"]});
        let vars = [("steps", &steps), ("input", &input)];
        assert!(eval_bool("steps.backup.output.all(r, r.size > 0)", &vars).unwrap());
        assert_eq!(eval("size(steps.backup.output)", &vars).unwrap(), json!(2));
        assert_eq!(eval("input.hosts", &vars).unwrap(), json!(["a", "b"]));
        assert!(eval_bool("steps.backup.status == 'succeeded' && input.go", &vars).unwrap());
        assert!(
            eval_bool("input.hosts", &vars)
                .unwrap_err()
                .contains("true or false")
        );
        assert!(eval("input.missing.deeper", &vars).is_err());
        assert_eq!(
            eval("{'n': input.hosts.map(h, h + '!')}", &vars).unwrap(),
            json!({"n": ["a!", "b!"]})
        );
    }
}
