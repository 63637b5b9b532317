//! Row → document, by the table's rule in `config.toml`.
//!
//! A document is identified by its [`DocumentKey`] (table + key column values). Its text comes
//! from the rule's template, e.g. `"{name}\n\n{description}"`, and is split into overlapping
//! chunks; each chunk becomes one point. Its payload is the row's columns (filtered by
//! `include`/`exclude`).

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::TableRule;
use crate::model::{DocumentKey, Row, canonical_json};

/// A text template: literal text and `{column}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

impl Template {
    /// Parses `{column}` placeholders; `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!("unclosed `{{{name}` in template `{text}`"));
                            }
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        return Err(format!("empty `{{}}` in template `{text}`"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(name));
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` in template `{text}` (write `}}}}` for a brace)"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Column(_))) {
            return Err(format!("template `{text}` uses no column"));
        }
        Ok(Template { parts })
    }

    /// Columns the template reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template over `row`. A column missing from the row is an error; a null
    /// column renders as nothing.
    pub fn render(&self, row: &Row) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Column(c) => match row.get(c) {
                    Some(v) => out.push_str(&value_text(v)),
                    None => return Err(missing_column(c, row)),
                },
            }
        }
        Ok(out.trim().to_string())
    }
}

/// A column's value as embeddable text.
fn value_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter(|v| !v.is_null())
            .map(value_text)
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn missing_column(column: &str, row: &Row) -> String {
    let columns: Vec<&str> = row.keys().map(String::as_str).collect();
    format!(
        "column `{column}` is not in the row; columns are {}",
        columns.join(", ")
    )
}

/// A row turned into a document, ready to embed.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub key: DocumentKey,
    /// The full text, or `None` when a template column was not sent (unchanged TOAST): the
    /// stored text and vectors stay.
    pub text: Option<String>,
    /// The text split into chunks (empty when `text` is `None`).
    pub chunks: Vec<String>,
    /// Hash of the full text (`_cdc.hash`), to skip re-embedding unchanged text.
    pub hash: Option<String>,
    /// Row columns stored in the payload.
    pub fields: Row,
}

/// A mapping failure: poison for the event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

/// A rule compiled once at start.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub rule: TableRule,
    pub template: Template,
}

impl CompiledRule {
    pub fn new(rule: &TableRule) -> Result<CompiledRule, String> {
        Ok(CompiledRule {
            template: Template::parse(&rule.text)?,
            rule: rule.clone(),
        })
    }

    /// The document key of `row` (a delete's `before` works too: it has the key columns).
    pub fn key(&self, row: &Row) -> Result<DocumentKey, MappingError> {
        let mut key = serde_json::Map::new();
        for column in &self.rule.id_columns {
            match row.get(column) {
                Some(Value::Null) => {
                    return Err(MappingError(format!("key column `{column}` is null")));
                }
                Some(v) => {
                    key.insert(column.clone(), v.clone());
                }
                None => {
                    return Err(MappingError(format!(
                        "{}: key {}",
                        self.rule.table,
                        missing_column(column, row)
                    )));
                }
            }
        }
        Ok(DocumentKey {
            table: self.rule.table.clone(),
            key: canonical_json(&Value::Object(key)),
        })
    }

    /// Builds the document for an upserted row. `unavailable` lists columns Debezium did not
    /// send (unchanged TOAST).
    pub fn document(&self, row: &Row, unavailable: &[String]) -> Result<Document, MappingError> {
        let key = self.key(row)?;
        let text_unavailable = self
            .template
            .columns()
            .any(|c| unavailable.iter().any(|u| u == c));
        let text =
            if text_unavailable {
                None
            } else {
                Some(self.template.render(row).map_err(|e| {
                    MappingError(format!("{}: text template: {e}", self.rule.table))
                })?)
            };
        let chunks = text
            .as_deref()
            .map(|t| chunk_text(t, self.rule.chunk_size, self.rule.chunk_overlap))
            .unwrap_or_default();
        Ok(Document {
            key,
            hash: text.as_deref().map(text_hash),
            text,
            chunks,
            fields: self.payload_fields(row),
        })
    }

    fn payload_fields(&self, row: &Row) -> Row {
        row.iter()
            .filter(|(k, _)| self.rule.include.is_empty() || self.rule.include.contains(k))
            .filter(|(k, _)| !self.rule.exclude.contains(k))
            .filter(|(k, _)| k.as_str() != "text" && k.as_str() != "_cdc")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Hex SHA-256 of the text (first 16 bytes).
pub fn text_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits `text` into chunks of at most `size` characters, consecutive chunks sharing
/// `overlap` characters. Breaks at whitespace when one is in the second half of the window.
/// An empty text gives one empty chunk, so every document has at least one point.
pub fn chunk_text(text: &str, size: usize, overlap: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= size {
        return vec![text.to_string()];
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    loop {
        let mut end = (start + size).min(chars.len());
        if end < chars.len()
            && let Some(ws) = (start + size / 2..end)
                .rev()
                .find(|&i| chars[i].is_whitespace())
        {
            end = ws;
        }
        let chunk: String = chars[start..end].iter().collect();
        chunks.push(chunk.trim().to_string());
        if end >= chars.len() {
            break;
        }
        start = end.saturating_sub(overlap).max(start + 1);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(text: &str) -> CompiledRule {
        CompiledRule::new(&TableRule {
            table: "public.products".into(),
            id_columns: vec!["id".into()],
            text: text.into(),
            include: vec![],
            exclude: vec!["secret".into()],
            chunk_size: 40,
            chunk_overlap: 10,
        })
        .unwrap()
    }

    fn row(v: Value) -> Row {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn template_renders_columns_and_literal_braces() {
        let t = Template::parse("{name} {{x}}: {tags}").unwrap();
        let r = row(json!({"name": "Tent", "tags": ["a", null, "b"]}));
        assert_eq!(t.render(&r).unwrap(), "Tent {x}: a, b");
        assert!(Template::parse("{name").is_err());
        assert!(Template::parse("name}").is_err());
        assert!(Template::parse("no columns").is_err());
    }

    #[test]
    fn missing_template_column_names_the_columns_present() {
        let e = rule("{title}")
            .document(&row(json!({"id": 1, "name": "x"})), &[])
            .unwrap_err();
        assert_eq!(
            e.0,
            "public.products: text template: column `title` is not in the row; columns are id, name"
        );
    }

    #[test]
    fn composite_keys_are_canonical() {
        let mut r = rule("{sku}");
        r.rule.id_columns = vec!["order_id".into(), "line_no".into()];
        let k = r
            .key(&row(json!({"line_no": 1, "order_id": 100, "sku": "s"})))
            .unwrap();
        assert_eq!(k.key, r#"{"line_no":1,"order_id":100}"#);
        assert!(r.key(&row(json!({"order_id": 100}))).is_err());
        assert!(
            r.key(&row(json!({"order_id": 100, "line_no": null})))
                .is_err()
        );
    }

    #[test]
    fn payload_honours_include_and_exclude() {
        let mut r = rule("{name}");
        let doc = r
            .document(
                &row(json!({"id": 1, "name": "n", "secret": "s", "text": "t"})),
                &[],
            )
            .unwrap();
        assert_eq!(doc.fields, row(json!({"id": 1, "name": "n"})));
        r.rule.include = vec!["name".into()];
        let doc = r
            .document(&row(json!({"id": 1, "name": "n"})), &[])
            .unwrap();
        assert_eq!(doc.fields, row(json!({"name": "n"})));
    }

    #[test]
    fn unavailable_template_column_keeps_the_stored_text() {
        let doc = rule("{name} {big}")
            .document(&row(json!({"id": 1, "name": "n"})), &["big".into()])
            .unwrap();
        assert_eq!(doc.text, None);
        assert!(doc.chunks.is_empty());
        let doc = rule("{name}")
            .document(&row(json!({"id": 1, "name": "n"})), &["big".into()])
            .unwrap();
        assert_eq!(doc.text.as_deref(), Some("n"));
    }

    #[test]
    fn chunks_cover_the_text_with_overlap() {
        let text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho";
        let chunks = chunk_text(text, 40, 10);
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(c.chars().count() <= 40, "{c}");
        }
        for word in text.split(' ') {
            assert!(chunks.iter().any(|c| c.contains(word)), "{word} lost");
        }
        assert_eq!(chunk_text("short", 40, 10), vec!["short"]);
        assert_eq!(chunk_text("", 40, 10), vec![""]);
        // No whitespace at all still terminates and covers.
        let solid = "x".repeat(95);
        let chunks = chunk_text(&solid, 40, 10);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 95 + 20);
    }

    #[test]
    fn hash_changes_with_text() {
        assert_eq!(text_hash("a"), text_hash("a"));
        assert_ne!(text_hash("a"), text_hash("b"));
        assert_eq!(text_hash("a").len(), 32);
    }
}
