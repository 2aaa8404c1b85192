//! Topic patterns with bindings, and topic templates.
//!
//! A source topic like `sensors/{sensor_id}/temperature` subscribes to the
//! filter `sensors/+/temperature` and binds the second level of each
//! message's topic to the field `sensor_id`. A sink topic like
//! `averages/{sensor_id}` is filled from the fields of each record.

/// One subscription pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    /// The MQTT filter subscribed to.
    pub filter: String,
    levels: Vec<Level>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    Plus,
    Hash,
    Bind(String),
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<TopicPattern, String> {
        if pattern.is_empty() {
            return Err("a topic filter must not be empty".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let level = if *p == "+" {
                Level::Plus
            } else if *p == "#" {
                if i + 1 != parts.len() {
                    return Err(format!("`#` must be the last level of `{pattern}`"));
                }
                Level::Hash
            } else if let Some(name) = p.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                {
                    return Err(format!(
                        "bad binding `{p}` in `{pattern}`: expected `{{field_name}}`"
                    ));
                }
                Level::Bind(name.to_string())
            } else if p.contains(['+', '#', '{', '}']) {
                return Err(format!(
                    "bad level `{p}` in `{pattern}`: wildcards and bindings take a whole level"
                ));
            } else {
                Level::Exact(p.to_string())
            };
            levels.push(level);
        }
        let filter = levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.as_str(),
                Level::Plus | Level::Bind(_) => "+",
                Level::Hash => "#",
            })
            .collect::<Vec<_>>()
            .join("/");
        Ok(TopicPattern { filter, levels })
    }

    /// Field names bound by this pattern.
    pub fn fields(&self) -> Vec<String> {
        self.levels
            .iter()
            .filter_map(|l| match l {
                Level::Bind(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// Matches `topic`; on a match calls `bind` for each bound level.
    pub fn matches<'t>(&self, topic: &'t str, mut bind: impl FnMut(&str, &'t str)) -> bool {
        // Topics starting with `$` never match wildcards at the first level.
        let mut parts = topic.split('/');
        let mut bound: Vec<(&str, &'t str)> = Vec::new();
        for (i, l) in self.levels.iter().enumerate() {
            match l {
                Level::Hash => {
                    if i == 0 && topic.starts_with('$') {
                        return false;
                    }
                    bound.iter().for_each(|(n, v)| bind(n, v));
                    return true;
                }
                _ => {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    match l {
                        Level::Exact(s) if s != part => return false,
                        Level::Plus | Level::Bind(_) if i == 0 && part.starts_with('$') => {
                            return false
                        }
                        Level::Bind(n) => bound.push((n, part)),
                        _ => {}
                    }
                }
            }
        }
        if parts.next().is_some() {
            return false;
        }
        bound.iter().for_each(|(n, v)| bind(n, v));
        true
    }
}

/// A sink topic with `{field}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
    /// The field that holds a whole incoming topic (the source's
    /// `topic_field`): its value keeps its `/` levels.
    whole_topic: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Field(String),
}

/// A field's value as a template sees it.
pub enum Piece<'a> {
    Str(&'a str),
    /// Missing or null.
    Missing,
    /// A number or a boolean, as JSON writes it.
    Other(String),
}

impl TopicTemplate {
    pub fn parse(t: &str) -> Result<TopicTemplate, String> {
        if t.is_empty() {
            return Err("a topic must not be empty".into());
        }
        if t.contains(['+', '#']) {
            return Err(format!("a publish topic cannot hold wildcards: `{t}`"));
        }
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("unclosed `{{` in topic `{t}`"));
            };
            let name = &rest[open + 1..open + close];
            if name.is_empty() {
                return Err(format!("empty `{{}}` in topic `{t}`"));
            }
            parts.push(TemplatePart::Field(name.to_string()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        Ok(TopicTemplate {
            parts,
            whole_topic: None,
        })
    }

    /// `{field}` is a whole topic: its `/` are kept (other fields' become
    /// `_`, since a value fills one level).
    pub fn with_whole_topic(mut self, field: Option<&str>) -> Self {
        self.whole_topic = field.map(str::to_string);
        self
    }

    pub fn fields(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                TemplatePart::Field(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn is_static(&self) -> bool {
        self.fields().is_empty()
    }

    /// Fills the template, writing `_unknown` for missing fields.
    pub fn render_lenient(&self, record: &serde_json::Value) -> String {
        self.fill(true, |f| json_piece(record, f))
            .unwrap_or_default()
    }

    /// Fills the template from a JSON object; `Err` names a missing field.
    pub fn render(&self, record: &serde_json::Value) -> Result<String, String> {
        self.fill(false, |f| json_piece(record, f))
    }

    /// Fills the template from looked-up values; `Err` names a missing
    /// field, and with `lenient` it is written as `_unknown` instead.
    pub fn fill<'a>(
        &self,
        lenient: bool,
        get: impl Fn(&str) -> Piece<'a>,
    ) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Text(s) => out.push_str(s),
                TemplatePart::Field(f) => match get(f) {
                    Piece::Str(s) if !s.is_empty() => {
                        if self.whole_topic.as_deref() == Some(f.as_str()) {
                            out.push_str(&s.replace(['+', '#'], "_"))
                        } else {
                            out.push_str(&s.replace(['/', '+', '#'], "_"))
                        }
                    }
                    Piece::Str(_) | Piece::Missing if lenient => out.push_str("_unknown"),
                    Piece::Str(_) | Piece::Missing => {
                        return Err(format!(
                            "the topic needs field `{f}`, which the record lacks"
                        ))
                    }
                    Piece::Other(s) => out.push_str(&s),
                },
            }
        }
        Ok(out)
    }
}

pub fn json_piece<'a>(record: &'a serde_json::Value, f: &str) -> Piece<'a> {
    let v = f
        .split('.')
        .try_fold(record, |v, k| v.get(k))
        .or_else(|| record.get(f));
    match v {
        Some(serde_json::Value::String(s)) => Piece::Str(s),
        Some(serde_json::Value::Null) | None => Piece::Missing,
        Some(other) => Piece::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings() {
        let p = TopicPattern::parse("sensors/{sensor_id}/temperature").unwrap();
        assert_eq!(p.filter, "sensors/+/temperature");
        let mut got = Vec::new();
        assert!(p.matches("sensors/s1/temperature", |n, v| got
            .push((n.to_string(), v.to_string()))));
        assert_eq!(got, vec![("sensor_id".to_string(), "s1".to_string())]);
        assert!(!p.matches("sensors/s1/humidity", |_, _| {}));
        assert!(!p.matches("sensors/s1/temperature/x", |_, _| {}));
        let h = TopicPattern::parse("site/{site}/#").unwrap();
        assert_eq!(h.filter, "site/+/#");
        assert!(h.matches("site/a/b/c", |_, _| {}));
        assert!(!TopicPattern::parse("#")
            .unwrap()
            .matches("$SYS/x", |_, _| {}));
        assert!(TopicPattern::parse("a/#/b").is_err());
        assert!(TopicPattern::parse("a/x{y}").is_err());
    }

    #[test]
    fn templates() {
        let t = TopicTemplate::parse("averages/{sensor_id}/{n}").unwrap();
        let rec = serde_json::json!({"sensor_id": "s/1", "n": 3});
        assert_eq!(t.render(&rec).unwrap(), "averages/s_1/3");
        assert!(t
            .render(&serde_json::json!({"n": 1}))
            .unwrap_err()
            .contains("sensor_id"));
        assert!(TopicTemplate::parse("a/+").is_err());
        assert!(TopicTemplate::parse("a/{x").is_err());
        assert!(TopicTemplate::parse("late/sensors").unwrap().is_static());
    }

    #[test]
    fn a_whole_topic_keeps_its_levels() {
        let t = TopicTemplate::parse("copy/{topic}/{id}")
            .unwrap()
            .with_whole_topic(Some("topic"));
        let rec = serde_json::json!({"topic": "a/b/c", "id": "x/y"});
        assert_eq!(t.render(&rec).unwrap(), "copy/a/b/c/x_y");
        let rec = serde_json::json!({"topic": "", "id": 1});
        assert!(t.render(&rec).is_err());
        assert_eq!(t.render_lenient(&rec), "copy/_unknown/1");
    }
}
