//! Secret references (`{{secret.NAME}}`, [`baton_proto::secret_ref`]) in an event's `env` and
//! `request.headers` values, replaced on the worker just before the run by the values of the
//! variables the assignment carries (those the event can read). The api never stores or sends
//! the substituted values anywhere else.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// `values` with every reference substituted from `variables`. The error names the field
/// (`env.TOKEN`) and the reference, never a value.
pub(crate) fn resolve_values(
    field: &str,
    values: BTreeMap<String, String>,
    variables: Option<&Map<String, Value>>,
) -> Result<BTreeMap<String, String>, String> {
    values
        .into_iter()
        .map(|(key, value)| {
            let resolved = baton_proto::secret_ref::resolve(&value, |name| {
                variables.and_then(|v| v.get(name)).and_then(Value::as_str)
            })
            .map_err(|e| format!("{field}.{key} {e}"))?
            .into_owned();
            Ok((key, resolved))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn substitutes_readable_variables_and_names_what_is_missing() {
        let vars = json!({"API_KEY": "s3cr3t"});
        let vars = vars.as_object();
        let env = BTreeMap::from([
            ("TOKEN".to_owned(), "Bearer {{secret.API_KEY}}".to_owned()),
            ("PLAIN".to_owned(), "x".to_owned()),
        ]);
        let done = resolve_values("env", env, vars).expect("resolves");
        assert_eq!(done["TOKEN"], "Bearer s3cr3t");
        assert_eq!(done["PLAIN"], "x");
        let missing = BTreeMap::from([("T".to_owned(), "{{secret.OTHER}}".to_owned())]);
        let err = resolve_values("env", missing, vars).expect_err("unreadable");
        assert!(
            err.starts_with("env.T ") && err.contains("\"OTHER\""),
            "{err}"
        );
    }
}
