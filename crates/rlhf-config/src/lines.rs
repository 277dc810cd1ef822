//! Key path → line number of a YAML document, for errors that point into the file.
//!
//! figment keeps no positions, so the file is parsed a second time with yaml-rust2's event
//! parser, whose events carry markers. Keys are dotted paths with list indices as segments
//! (`workers.1.roles`); a list item's own line is recorded under its index (`workers.1`).

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A YAML syntax error: 1-based line and column, and the parser's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Lines of the keys of one YAML document.
#[derive(Debug, Clone, Default)]
pub(crate) struct LineMap {
    lines: HashMap<String, usize>,
}

impl LineMap {
    /// Parses `text` (the first document only) and records the line of every key and list item.
    pub fn parse(text: &str) -> Result<LineMap, SyntaxError> {
        let mut builder = Builder::default();
        Parser::new_from_str(text)
            .load(&mut builder, false)
            .map_err(|e| SyntaxError {
                line: e.marker().line(),
                // yaml-rust2 counts columns from 0 whatever its docs say.
                column: e.marker().col() + 1,
                message: e.info().to_owned(),
            })?;
        if let Some(duplicate) = builder.duplicate {
            return Err(duplicate);
        }
        Ok(LineMap {
            lines: builder.lines,
        })
    }

    /// The 1-based line of `key` (dotted, indices as segments), if the document has it.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }
}

enum Frame {
    Mapping {
        /// The path segment this mapping sits at (None for the document root or a complex key).
        segment: Option<String>,
        /// The key whose value comes next; None while a key is expected.
        key: Option<String>,
    },
    Sequence {
        segment: Option<String>,
        next_index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    /// Segments of the enclosing collections (only those with a segment).
    path: Vec<String>,
    lines: HashMap<String, usize>,
    /// The first key that occurs twice in one mapping (serde_norway rejects those too, but
    /// points at the mapping rather than the key).
    duplicate: Option<SyntaxError>,
}

impl Builder {
    fn record(&mut self, last: &str, mark: Marker, is_key: bool) {
        let mut key = self.path.join(".");
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(last);
        if self.lines.contains_key(&key) {
            if is_key && last != "?" && self.duplicate.is_none() {
                self.duplicate = Some(SyntaxError {
                    line: mark.line(),
                    column: mark.col() + 1,
                    message: format!("duplicate key `{last}`"),
                });
            }
            return;
        }
        self.lines.insert(key, mark.line());
    }

    /// A node starts; returns the path segment it sits at, None when it is a mapping key (or
    /// the root). Scalar keys are recorded here.
    fn node_start(&mut self, scalar_key: Option<&str>, mark: Marker) -> NodeRole {
        match self.stack.last_mut() {
            None => NodeRole::Value(None),
            Some(Frame::Mapping { key: None, .. }) => {
                let name = scalar_key.unwrap_or("?").to_owned();
                self.record(&name, mark, true);
                NodeRole::Key(name)
            }
            Some(Frame::Mapping { key: Some(k), .. }) => NodeRole::Value(Some(k.clone())),
            Some(Frame::Sequence { next_index, .. }) => {
                let index = next_index.to_string();
                self.record(&index, mark, false);
                NodeRole::Value(Some(index))
            }
        }
    }

    /// A complete node (scalar, alias or a closed collection) ended in the current frame.
    fn node_done(&mut self, role: NodeRole) {
        match (self.stack.last_mut(), role) {
            (Some(Frame::Mapping { key, .. }), NodeRole::Key(name)) => *key = Some(name),
            (Some(Frame::Mapping { key, .. }), NodeRole::Value(_)) => *key = None,
            (Some(Frame::Sequence { next_index, .. }), _) => *next_index += 1,
            (None, _) => {}
        }
    }

    fn open(&mut self, role: NodeRole, sequence: bool) {
        // A collection used as a mapping key gets no segment: its keys are not config keys.
        let segment = match role {
            NodeRole::Value(segment) => segment,
            NodeRole::Key(_) => None,
        };
        if let Some(s) = &segment {
            self.path.push(s.clone());
        }
        self.stack.push(if sequence {
            Frame::Sequence {
                segment,
                next_index: 0,
            }
        } else {
            Frame::Mapping { segment, key: None }
        });
    }

    fn close(&mut self) {
        let segment = match self.stack.pop() {
            Some(Frame::Mapping { segment, .. } | Frame::Sequence { segment, .. }) => segment,
            None => None,
        };
        if segment.is_some() {
            self.path.pop();
        }
        // The collection was a key or a value of its parent; either way the parent moves on.
        let was_key = matches!(self.stack.last(), Some(Frame::Mapping { key: None, .. }));
        self.node_done(if was_key {
            NodeRole::Key("?".to_owned())
        } else {
            NodeRole::Value(None)
        });
    }
}

enum NodeRole {
    Key(String),
    Value(Option<String>),
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                let role = self.node_start(Some(&text), mark);
                self.node_done(role);
            }
            Event::Alias(_) => {
                let role = self.node_start(None, mark);
                self.node_done(role);
            }
            Event::MappingStart(..) => {
                let role = self.node_start(None, mark);
                self.open(role, false);
            }
            Event::SequenceStart(..) => {
                let role = self.node_start(None, mark);
                self.open(role, true);
            }
            Event::MappingEnd | Event::SequenceEnd => self.close(),
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
run:
  name: x
  dir: runs
workers:
  - name: a
    roles: [actor, critic]
  -
    name: b
    roles:
      - reward
      - reference
models: {policy: p, reward: {kind: model}}
";

    #[test]
    fn records_nested_keys_list_items_and_flow_maps() {
        let map = LineMap::parse(DOC).unwrap();
        assert_eq!(map.line("run"), Some(1));
        assert_eq!(map.line("run.name"), Some(2));
        assert_eq!(map.line("run.dir"), Some(3));
        assert_eq!(map.line("workers"), Some(4));
        assert_eq!(map.line("workers.0.name"), Some(5));
        assert_eq!(map.line("workers.0.roles"), Some(6));
        assert_eq!(map.line("workers.0.roles.1"), Some(6));
        assert_eq!(map.line("workers.1.name"), Some(8));
        assert_eq!(map.line("workers.1.roles.1"), Some(11));
        assert_eq!(map.line("models.policy"), Some(12));
        assert_eq!(map.line("models.reward.kind"), Some(12));
        assert_eq!(map.line("models.critic"), None);
        assert_eq!(map.line("name"), None);
    }

    #[test]
    fn complex_keys_do_not_shift_later_keys() {
        let doc = "a:\n  ? [x, y]\n  : 1\n  b: 2\nc: 3\n";
        let map = LineMap::parse(doc).unwrap();
        assert_eq!(map.line("a.b"), Some(4));
        assert_eq!(map.line("c"), Some(5));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = LineMap::parse("run:\n  name: [x\nmodels: 1\n").unwrap_err();
        assert!(err.line >= 2, "{err:?}");
        assert!(!err.message.is_empty());
    }

    #[test]
    fn duplicate_keys_point_at_the_second_one() {
        let err = LineMap::parse("run:\n  name: a\nmodels: {}\nrun:\n  dir: x\n").unwrap_err();
        assert_eq!((err.line, err.column), (4, 1), "{err:?}");
        assert!(err.message.contains("duplicate key `run`"), "{err:?}");
        // The same key in different mappings is fine.
        assert!(LineMap::parse("a: {name: x}\nb: {name: y}\n").is_ok());
    }
}
