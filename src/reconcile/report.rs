//! What a reconcile run found: counts per table and state, a few examples of each, the repair
//! events published; printed for people, as JSON for machines, and as metrics by the daemon.

use std::time::Duration;

use serde_json::{Value, json};

use crate::model::{DocumentKey, SourcePosition};

/// Keys per state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: usize,
    pub missing: usize,
    pub stale: usize,
    pub orphan: usize,
}

impl Counts {
    pub fn by_state(&self) -> [(&'static str, usize); 4] {
        [
            ("ok", self.ok),
            ("missing", self.missing),
            ("stale", self.stale),
            ("orphan", self.orphan),
        ]
    }

    pub fn drift(&self) -> usize {
        self.missing + self.stale + self.orphan
    }
}

/// Repair events published, by action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Rows re-read under lock and published as upserts.
    pub upserts: usize,
    /// Of those, documents rewritten whole (damaged chunks).
    pub rewrites: usize,
    /// Conditional deletes of orphans.
    pub deletes: usize,
    /// Drifted rows gone by the time they were locked (their delete is in the stream).
    pub gone: usize,
}

impl Repairs {
    pub fn by_action(&self) -> [(&'static str, usize); 3] {
        [
            ("upsert", self.upserts - self.rewrites),
            ("rewrite", self.rewrites),
            ("delete", self.deletes),
        ]
    }

    pub fn published(&self) -> usize {
        self.upserts + self.deletes
    }
}

/// One example of a drifted key.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub key: DocumentKey,
    pub detail: Option<String>,
    pub position: Option<SourcePosition>,
}

/// One table's result.
#[derive(Debug, Clone, Default)]
pub struct TableReport {
    pub table: String,
    /// Source rows read.
    pub rows: usize,
    /// Index points scanned.
    pub points: usize,
    pub counts: Counts,
    /// Rows whose document is newer than the snapshot (counted in `ok`).
    pub ahead: usize,
    pub missing: Vec<Example>,
    pub stale: Vec<Example>,
    pub orphan: Vec<Example>,
    pub repairs: Repairs,
    /// Things the operator should know (several connectors, non-LSN positions, ...).
    pub notes: Vec<String>,
    /// Examples kept per state.
    pub(crate) examples: usize,
}

impl TableReport {
    pub fn new(table: &str, examples: usize) -> TableReport {
        TableReport {
            table: table.to_string(),
            examples,
            ..TableReport::default()
        }
    }

    pub fn add_missing(&mut self, key: &DocumentKey) {
        self.counts.missing += 1;
        if self.missing.len() < self.examples {
            self.missing.push(Example {
                key: key.clone(),
                detail: None,
                position: None,
            });
        }
    }

    pub fn add_stale(&mut self, key: &DocumentKey, reason: &str) {
        self.counts.stale += 1;
        if self.stale.len() < self.examples {
            self.stale.push(Example {
                key: key.clone(),
                detail: Some(reason.to_string()),
                position: None,
            });
        }
    }

    pub fn add_orphan(&mut self, key: &DocumentKey, position: Option<&SourcePosition>) {
        self.counts.orphan += 1;
        if self.orphan.len() < self.examples {
            self.orphan.push(Example {
                key: key.clone(),
                detail: None,
                position: position.cloned(),
            });
        }
    }

    pub fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    fn json(&self) -> Value {
        let examples = |list: &[Example]| -> Vec<Value> {
            list.iter()
                .map(|e| {
                    let mut v = json!({"key": e.key.key});
                    if let Some(d) = &e.detail {
                        v["reason"] = json!(d);
                    }
                    if let Some(p) = &e.position {
                        v["position"] = json!(p);
                    }
                    v
                })
                .collect()
        };
        json!({
            "table": self.table,
            "rows": self.rows,
            "points": self.points,
            "ok": self.counts.ok,
            "missing": self.counts.missing,
            "stale": self.counts.stale,
            "orphan": self.counts.orphan,
            "ahead": self.ahead,
            "examples": {
                "missing": examples(&self.missing),
                "stale": examples(&self.stale),
                "orphan": examples(&self.orphan),
            },
            "repairs": {
                "upserts": self.repairs.upserts,
                "rewrites": self.repairs.rewrites,
                "deletes": self.repairs.deletes,
                "gone": self.repairs.gone,
            },
            "notes": self.notes,
        })
    }
}

/// A whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub duration: Duration,
    pub repaired: bool,
}

impl Report {
    pub fn drift(&self) -> usize {
        self.tables.iter().map(|t| t.counts.drift()).sum()
    }

    pub fn rows(&self) -> usize {
        self.tables.iter().map(|t| t.rows).sum()
    }

    pub fn rows_per_second(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.rows() as f64 / secs
        } else {
            0.0
        }
    }

    /// `public.a: 3 missing, 1 orphan; public.b: ok`
    pub fn summary_line(&self) -> String {
        self.tables
            .iter()
            .map(|t| {
                let drift: Vec<String> = t
                    .counts
                    .by_state()
                    .iter()
                    .filter(|(s, n)| *s != "ok" && *n > 0)
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect();
                if drift.is_empty() {
                    format!("{}: ok", t.table)
                } else {
                    format!("{}: {}", t.table, drift.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn json(&self) -> Value {
        json!({
            "ok": self.drift() == 0,
            "drift": self.drift(),
            "rows": self.rows(),
            "duration_s": self.duration.as_secs_f64(),
            "rows_per_second": self.rows_per_second(),
            "repaired": self.repaired,
            "tables": self.tables.iter().map(TableReport::json).collect::<Vec<_>>(),
        })
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            out.push_str(&format!(
                "{}: {} rows, {} points: {} ok, {} missing, {} stale, {} orphan{}\n",
                t.table,
                t.rows,
                t.points,
                t.counts.ok,
                t.counts.missing,
                t.counts.stale,
                t.counts.orphan,
                if t.ahead > 0 {
                    format!(" ({} changed since the snapshot, not judged)", t.ahead)
                } else {
                    String::new()
                }
            ));
            for (state, list) in [
                ("missing", &t.missing),
                ("stale", &t.stale),
                ("orphan", &t.orphan),
            ] {
                for e in list {
                    let detail = match (&e.detail, &e.position) {
                        (Some(d), _) => format!(": {d}"),
                        (None, Some(p)) => format!(" (at {})", json!(p)),
                        _ => String::new(),
                    };
                    out.push_str(&format!("  {state:<8} {}{detail}\n", e.key.key));
                }
            }
            if self.repaired {
                out.push_str(&format!(
                    "  repair: {} upserts ({} rewrites), {} conditional deletes published{}\n",
                    t.repairs.upserts,
                    t.repairs.rewrites,
                    t.repairs.deletes,
                    if t.repairs.gone > 0 {
                        format!(
                            "; {} rows gone meanwhile (their deletes are in the stream)",
                            t.repairs.gone
                        )
                    } else {
                        String::new()
                    }
                ));
            }
            for note in &t.notes {
                out.push_str(&format!("  note: {note}\n"));
            }
        }
        out.push_str(&format!(
            "{} rows in {:.1} s ({:.0} rows/s): {}\n",
            self.rows(),
            self.duration.as_secs_f64(),
            self.rows_per_second(),
            if self.drift() == 0 {
                "the index equals the source".to_string()
            } else if self.repaired {
                format!(
                    "{} drifted; repair events published: run reconcile again once the daemon has applied them",
                    self.drift()
                )
            } else {
                format!("{} drifted (--repair heals it)", self.drift())
            }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_bounded_and_counts_are_not() {
        let mut t = TableReport::new("public.t", 2);
        for i in 0..5 {
            t.add_missing(&DocumentKey {
                table: "public.t".into(),
                key: format!("{{\"id\":{i}}}"),
            });
        }
        assert_eq!(t.counts.missing, 5);
        assert_eq!(t.missing.len(), 2);
        let r = Report {
            tables: vec![t],
            ..Report::default()
        };
        assert_eq!(r.drift(), 5);
        assert_eq!(r.summary_line(), "public.t: 5 missing");
        assert_eq!(
            r.json()["tables"][0]["examples"]["missing"][1]["key"],
            json!("{\"id\":1}")
        );
    }
}
