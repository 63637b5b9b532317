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

/// A document's text, rendered from a whole row and cut into chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The full text (`""` when the template renders to nothing).
    pub text: String,
    /// Hash of the full text (`_cdc.hash`), to skip re-embedding unchanged text.
    pub hash: String,
    /// The chunks to index: at most `max_chunks` of them (empty for an empty text).
    pub chunks: Vec<String>,
    /// The text was longer than `max_chunks` chunks: only the first part is indexed.
    pub truncated: bool,
}

/// A mapping failure: poison for the event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

/// Payload keys the index reserves for itself or for the LlamaIndex service. A source column
/// with one of these names (or one that starts with [`ESCAPE_PREFIX`]) is stored under
/// `_col_<name>`, so every column is kept and the stored payload is the same in every sink.
pub const RESERVED_PAYLOAD_KEYS: [&str; 7] = [
    "text",
    "_cdc",
    "doc_id",
    "document_id",
    "ref_doc_id",
    "_node_content",
    "_node_type",
];

/// Prefix of an escaped column name in the payload.
pub const ESCAPE_PREFIX: &str = "_col_";

/// The payload key of column `name`.
pub fn payload_key(name: &str) -> std::borrow::Cow<'_, str> {
    if RESERVED_PAYLOAD_KEYS.contains(&name) || name.starts_with(ESCAPE_PREFIX) {
        std::borrow::Cow::Owned(format!("{ESCAPE_PREFIX}{name}"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// The column of payload key `key`, or `None` for the index's own keys (`text`, `_cdc`, ...).
pub fn column_of_payload_key(key: &str) -> Option<&str> {
    match key.strip_prefix(ESCAPE_PREFIX) {
        Some(column) => Some(column),
        None if RESERVED_PAYLOAD_KEYS.contains(&key) => None,
        None => Some(key),
    }
}

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

    /// Is `column` stored in the payload (by `include` / `exclude`)?
    pub fn is_payload_column(&self, column: &str) -> bool {
        (self.rule.include.is_empty() || self.rule.include.iter().any(|c| c == column))
            && !self.rule.exclude.iter().any(|c| c == column)
    }

    /// Is `column` used by the text template?
    pub fn is_template_column(&self, column: &str) -> bool {
        self.template.columns().any(|c| c == column)
    }

    /// The columns of `row` the index keeps: payload columns and template columns. The rest
    /// is dropped at once, so a batch holds only what it will write.
    pub fn kept(&self, row: Row) -> Row {
        row.into_iter()
            .filter(|(k, _)| self.is_payload_column(k) || self.is_template_column(k))
            .collect()
    }

    /// Template columns that `values` lacks.
    pub fn missing_template_columns<'a>(&'a self, values: &Row) -> Vec<&'a str> {
        let mut missing: Vec<&str> = self
            .template
            .columns()
            .filter(|c| !values.contains_key(*c))
            .collect();
        missing.dedup();
        missing
    }

    /// Renders the document's text from a whole row (every template column present).
    pub fn render(&self, values: &Row) -> Result<Rendered, MappingError> {
        let text = self
            .template
            .render(values)
            .map_err(|e| MappingError(format!("{}: text template: {e}", self.rule.table)))?;
        let (chunks, truncated) = if text.is_empty() {
            (Vec::new(), false)
        } else {
            chunk_text_bounded(
                &text,
                self.rule.chunk_size,
                self.rule.chunk_overlap,
                self.rule.max_chunks,
            )
        };
        Ok(Rendered {
            hash: text_hash(&text),
            text,
            chunks,
            truncated,
        })
    }

    /// The payload fields of `values`: payload columns, under their (escaped) payload keys.
    /// Nulls are values and are kept.
    pub fn payload_fields(&self, values: &Row) -> Row {
        values
            .iter()
            .filter(|(k, _)| self.is_payload_column(k))
            .map(|(k, v)| (payload_key(k).into_owned(), v.clone()))
            .collect()
    }

    /// Template columns that are not payload columns: the index keeps them in
    /// `_cdc.hidden` (chunk 0) so a later event that does not send them (unchanged TOAST) can
    /// still re-render the text.
    pub fn hidden_fields(&self, values: &Row) -> Row {
        values
            .iter()
            .filter(|(k, _)| self.is_template_column(k) && !self.is_payload_column(k))
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
/// An empty text gives one empty chunk.
pub fn chunk_text(text: &str, size: usize, overlap: usize) -> Vec<String> {
    chunk_text_bounded(text, size, overlap, usize::MAX).0
}

/// [`chunk_text`], stopping after `max_chunks` chunks; `true` when text was left out.
pub fn chunk_text_bounded(
    text: &str,
    size: usize,
    overlap: usize,
    max_chunks: usize,
) -> (Vec<String>, bool) {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= size {
        return (vec![text.to_string()], false);
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    loop {
        if chunks.len() == max_chunks {
            return (chunks, true);
        }
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
    (chunks, false)
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
            max_chunks: 100,
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
            .render(&row(json!({"id": 1, "name": "x"})))
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
    fn payload_honours_include_and_exclude_and_escapes_reserved_names() {
        let mut r = rule("{name}");
        let values = r.kept(row(
            json!({"id": 1, "name": "n", "secret": "s", "text": "t", "_col_x": 1, "other": null}),
        ));
        assert_eq!(
            r.payload_fields(&values),
            row(json!({"id": 1, "name": "n", "_col_text": "t", "_col__col_x": 1, "other": null}))
        );
        assert!(
            r.hidden_fields(&values).is_empty(),
            "secret is not in the template"
        );
        r.rule.include = vec!["name".into()];
        assert_eq!(r.payload_fields(&values), row(json!({"name": "n"})));
        for column in ["text", "_cdc", "doc_id", "_col_x", "plain"] {
            let key = payload_key(column);
            assert_eq!(column_of_payload_key(&key), Some(column), "{column}");
        }
        assert_eq!(column_of_payload_key("text"), None);
        assert_eq!(column_of_payload_key("_cdc"), None);
    }

    #[test]
    fn template_columns_outside_the_payload_are_kept_hidden() {
        let mut r = rule("{name} {secret}");
        r.rule.include = vec!["id".into(), "name".into()];
        let values = r.kept(row(
            json!({"id": 1, "name": "n", "secret": "s", "unused": 1}),
        ));
        assert!(
            !values.contains_key("unused"),
            "neither payload nor template"
        );
        assert_eq!(r.hidden_fields(&values), row(json!({"secret": "s"})));
        assert!(!r.payload_fields(&values).contains_key("secret"));
        assert_eq!(
            r.missing_template_columns(&row(json!({"name": "n"}))),
            vec!["secret"]
        );
    }

    #[test]
    fn render_hashes_the_whole_text_and_bounds_the_chunks() {
        let mut r = rule("{name}");
        r.rule.max_chunks = 2;
        let long = "word ".repeat(100);
        let out = r.render(&row(json!({"name": long}))).unwrap();
        assert_eq!(out.chunks.len(), 2);
        assert!(out.truncated);
        assert_eq!(out.hash, text_hash(long.trim()));
        let empty = r.render(&row(json!({"name": null}))).unwrap();
        assert!(empty.chunks.is_empty() && empty.text.is_empty());
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
