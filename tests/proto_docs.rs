//! Checks that every service, rpc, message, enum, enum value, oneof and field in proto/sagad/v1
//! carries a comment: clients in other languages are written from the .proto files alone.

use std::path::Path;

/// A declaration of a .proto file that has no comment: its 1-based line, kind and name.
#[derive(Debug, PartialEq, Eq)]
struct Undocumented {
    line: usize,
    kind: &'static str,
    name: String,
}

/// The kind of block a `{` opens, so that a statement is read as what it declares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Service,
    Message,
    Enum,
    Oneof,
    Other,
}

/// Every declaration in `source` (the text of one .proto file) that has neither a comment on the
/// line directly above it (a `//` line, or the end of a `/* */` block) nor one trailing on its
/// own line. A blank line between a comment and the declaration leaves the declaration bare.
fn undocumented(source: &str) -> Vec<Undocumented> {
    let lines: Vec<&str> = source.lines().collect();
    let mut blocks: Vec<Block> = Vec::new();
    let mut found = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let (code, trailing_comment) = match line.find("//") {
            Some(at) => (line[..at].trim(), true),
            None => (line.trim(), false),
        };
        if code.is_empty() {
            continue;
        }
        let mut words = code
            .split(|c: char| c.is_whitespace() || "{};=(<".contains(c))
            .filter(|word| !word.is_empty());
        let first = words.next().unwrap_or_default();
        let second = words.next().unwrap_or_default().to_string();
        let inside = blocks.last().copied();
        let declared: Option<(&'static str, String, Block)> = match first {
            "service" => Some(("service", second, Block::Service)),
            "message" => Some(("message", second, Block::Message)),
            "enum" => Some(("enum", second, Block::Enum)),
            "oneof" => Some(("oneof", second, Block::Oneof)),
            "rpc" if inside == Some(Block::Service) => Some(("rpc", second, Block::Other)),
            "option" | "reserved" | "extensions" | "syntax" | "package" | "import" => None,
            _ if code.contains('=') => match inside {
                Some(Block::Enum) => Some(("enum value", first.to_string(), Block::Other)),
                Some(Block::Message | Block::Oneof) => {
                    Some(("field", field_name(code), Block::Other))
                }
                _ => None,
            },
            _ => None,
        };
        let opens = declared
            .as_ref()
            .map_or(Block::Other, |(_, _, block)| *block);
        if let Some((kind, name, _)) = declared {
            let above = index
                .checked_sub(1)
                .and_then(|previous| lines.get(previous))
                .map_or("", |previous| previous.trim());
            let commented_above = above.starts_with("//") || above.ends_with("*/");
            if !commented_above && !trailing_comment {
                found.push(Undocumented {
                    line: index + 1,
                    kind,
                    name,
                });
            }
        }
        for c in code.chars() {
            match c {
                '{' => blocks.push(opens),
                '}' => {
                    blocks.pop();
                }
                _ => {}
            }
        }
    }
    found
}

/// The name of the field a statement such as `repeated string trigger = 2;` or
/// `map<string, string> labels = 7;` declares: the last word before its `=`.
fn field_name(code: &str) -> String {
    code.split('=')
        .next()
        .and_then(|declaration| declaration.split_whitespace().last())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn every_field_message_enum_value_and_rpc_in_the_protos_has_a_comment() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/sagad/v1");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("read proto/sagad/v1")
        .map(|entry| entry.expect("list proto/sagad/v1").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .proto files in {}", dir.display());

    let mut report = Vec::new();
    for path in &files {
        let source = std::fs::read_to_string(path).expect("read a .proto file");
        let shown = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(path);
        for item in undocumented(&source) {
            report.push(format!(
                "{}:{}: {} {}",
                shown.display(),
                item.line,
                item.kind,
                item.name
            ));
        }
    }
    assert!(
        report.is_empty(),
        "{} declarations have no comment directly above them or trailing on their line; say what \
         each means for a client that reads only the .proto (units, allowed values, what unset \
         means, when it is set):\n{}",
        report.len(),
        report.join("\n")
    );
}

#[test]
fn the_check_flags_each_kind_of_declaration_left_without_a_comment() {
    let source = "\
syntax = \"proto3\";
package demo.v1;

service Demo {
  rpc Bare(A) returns (A);
  // Documented.
  rpc Documented(A) returns (A);
}

message A {
  string bare = 1;
  // Documented.
  map<string, string> documented = 2;

  repeated string after_a_blank_line = 3;
  optional uint32 trailing = 4; // Documented.
  oneof choice {
    // Documented.
    A inner = 5;
  }
  message Nested {}
}

// Documented.
enum E {
  E_UNSPECIFIED = 0;
  option allow_alias = true;
}
";
    let items = undocumented(source);
    let found: Vec<(usize, &str, &str)> = items
        .iter()
        .map(|item| (item.line, item.kind, item.name.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (4, "service", "Demo"),
            (5, "rpc", "Bare"),
            (10, "message", "A"),
            (11, "field", "bare"),
            (15, "field", "after_a_blank_line"),
            (17, "oneof", "choice"),
            (21, "message", "Nested"),
            (26, "enum value", "E_UNSPECIFIED"),
        ]
    );
}
