//! Reading an attribute set from an evaluation's JSON, attribute by
//! attribute, with errors that name the attribute and never its value.
//!
//! Fleet metadata is written by people, and a secret typed into the wrong
//! attribute (a password as a key's `user`, a token as a port) must not be
//! repeated into stderr, `--json`, events or the history. serde's own messages
//! quote the value (``invalid type: integer `73194821` ``), so metadata is not
//! read with derived deserializers: an [`Attrs`] takes each attribute it
//! knows, checks its JSON type, and says what was wrong by kind only ("must
//! be a string, not a number"). Attributes nobody took are an error naming
//! them, with the accepted ones.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The kind of a JSON value, for errors: never the value itself.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an attribute set",
    }
}

/// An attribute set being read; see the module docs.
#[derive(Debug)]
pub struct Attrs {
    /// Where it is, for errors: `deployment`, `deployment.keys.db`.
    path: String,
    map: BTreeMap<String, Value>,
    /// Every attribute asked for, in the order asked (the accepted ones).
    known: Vec<&'static str>,
}

impl Attrs {
    /// `value` as an attribute set at `path` (`null` is an empty one).
    pub fn new(path: &str, value: Value) -> Result<Attrs, String> {
        let map: Map<String, Value> = match value {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                return Err(format!(
                    "{path} must be an attribute set, not {}",
                    kind(&other)
                ));
            }
        };
        Ok(Attrs {
            path: path.to_string(),
            map: map.into_iter().collect(),
            known: Vec::new(),
        })
    }

    /// Where this attribute set is.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `path.name`, for errors about one attribute.
    pub fn at(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }

    fn take(&mut self, name: &'static str) -> Option<Value> {
        if !self.known.contains(&name) {
            self.known.push(name);
        }
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn wrong(&self, name: &str, what: &str, value: &Value) -> String {
        format!("{} must be {what}, not {}", self.at(name), kind(value))
    }

    /// Whether the attribute is present and not null (without taking it).
    pub fn has(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| !v.is_null())
    }

    /// Whether the attribute is present and `null` (as opposed to absent).
    pub fn is_null(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| v.is_null())
    }

    /// An attribute of any type, taken as is (null or absent: `None`).
    pub fn value(&mut self, name: &'static str) -> Option<Value> {
        self.take(name)
    }

    /// An attribute that is accepted and deliberately not used (say so in
    /// the README): taken whatever its type.
    pub fn accept(&mut self, name: &'static str) {
        self.take(name);
    }

    pub fn string(&mut self, name: &'static str) -> Result<Option<String>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(name, "a string", &other)),
        }
    }

    pub fn bool(&mut self, name: &'static str) -> Result<Option<bool>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.wrong(name, "a boolean (true or false)", &other)),
        }
    }

    /// A number (integer or not).
    pub fn number(&mut self, name: &'static str) -> Result<Option<f64>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{} is not a usable number", self.at(name))),
            Some(other) => Err(self.wrong(name, "a number", &other)),
        }
    }

    /// A whole number from `min` to `max`; out of range says the range only.
    pub fn integer(
        &mut self,
        name: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(format!(
                    "{} must be a whole number from {min} to {max}",
                    self.at(name)
                )),
            },
            Some(other) => Err(self.wrong(name, "a whole number", &other)),
        }
    }

    /// A list of strings (null or absent: empty).
    pub fn strings(&mut self, name: &'static str) -> Result<Vec<String>, String> {
        Ok(self.string_list(name)?.unwrap_or_default())
    }

    /// A list of strings, or `None` when null or absent.
    pub fn string_list(&mut self, name: &'static str) -> Result<Option<Vec<String>>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s),
                        other => {
                            return Err(format!(
                                "{}[{i}] must be a string, not {}",
                                self.at(name),
                                kind(&other)
                            ));
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(other) => Err(self.wrong(name, "a list of strings", &other)),
        }
    }

    /// A nested attribute set (null or absent: an empty one).
    pub fn attrs(&mut self, name: &'static str) -> Result<Attrs, String> {
        let path = self.at(name);
        Attrs::new(&path, self.take(name).unwrap_or(Value::Null))
    }

    /// A nested attribute set of attribute sets, by name (null or absent:
    /// none), each read at `path.name.<attr>`.
    pub fn attrs_by_name(&mut self, name: &'static str) -> Result<Vec<(String, Value)>, String> {
        match self.take(name) {
            None => Ok(Vec::new()),
            Some(Value::Object(map)) => Ok(map.into_iter().collect()),
            Some(other) => Err(self.wrong(name, "an attribute set", &other)),
        }
    }

    /// Every attribute, by name: an attribute set whose names are data
    /// (hosts, keys, profiles), each read on its own.
    pub fn into_entries(self) -> Vec<(String, Value)> {
        self.map.into_iter().collect()
    }

    /// A list of values (null or absent: empty).
    pub fn list(&mut self, name: &'static str) -> Result<Vec<Value>, String> {
        match self.take(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(self.wrong(name, "a list", &other)),
        }
    }

    /// Every attribute was taken; an unknown one is an error naming it and
    /// the accepted ones (so a typo can never silently disable something).
    pub fn finish(self) -> Result<(), String> {
        let Some(unknown) = self.map.keys().next() else {
            return Ok(());
        };
        let accepted: Vec<String> = self.known.iter().map(|n| format!("`{n}`")).collect();
        Err(format!(
            "{}: unknown field `{unknown}`, expected one of {}",
            self.path,
            accepted.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_attribute_and_the_kind_never_the_value() {
        let mut a = Attrs::new("deployment.keys.db", json!({ "user": 73194821 })).unwrap();
        let e = a.string("user").unwrap_err();
        assert_eq!(e, "deployment.keys.db.user must be a string, not a number");
        assert!(!e.contains("73194821"));
        let mut a = Attrs::new("d", json!({ "port": "hunter2", "l": ["a", 7] })).unwrap();
        let e = a.integer("port", 1, 65535).unwrap_err();
        assert!(e.contains("d.port") && !e.contains("hunter2"), "{e}");
        assert_eq!(
            a.strings("l").unwrap_err(),
            "d.l[1] must be a string, not a number"
        );
        let mut a = Attrs::new("d", json!({ "port": 70000 })).unwrap();
        let e = a.integer("port", 1, 65535).unwrap_err();
        assert!(!e.contains("70000"), "{e}");
        assert!(
            Attrs::new("d", json!("secret"))
                .unwrap_err()
                .contains("not a string")
        );
    }

    #[test]
    fn nulls_are_absent_and_unknown_attributes_are_named_with_the_accepted_ones() {
        let mut a = Attrs::new("d", json!({ "a": null, "b": true, "typo": 1 })).unwrap();
        assert_eq!(a.string("a").unwrap(), None);
        assert_eq!(a.bool("b").unwrap(), Some(true));
        assert_eq!(a.strings("c").unwrap(), Vec::<String>::new());
        assert_eq!(
            a.finish().unwrap_err(),
            "d: unknown field `typo`, expected one of `a`, `b`, `c`"
        );
        let mut a = Attrs::new("d", Value::Null).unwrap();
        assert_eq!(a.number("n").unwrap(), None);
        assert!(a.finish().is_ok());
    }
}
