//! Configuration files as sagactl reads them: TOML, YAML or JSON, told apart by the extension.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Parses `text` in the format its file `extension` names (without the dot, any case).
pub fn parse<T: DeserializeOwned>(extension: &str, text: &str) -> Result<T, String> {
    match extension.to_ascii_lowercase().as_str() {
        "toml" => toml::from_str(text).map_err(|e| e.to_string()),
        "yaml" | "yml" => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
        "json" => serde_json::from_str(text).map_err(|e| e.to_string()),
        other => Err(format!(
            "cannot tell the format from the extension {other:?}: name the file .toml, .yaml, .yml or .json"
        )),
    }
}

/// Reads and parses a file; errors name the file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    if !matches!(
        extension.to_ascii_lowercase().as_str(),
        "toml" | "yaml" | "yml" | "json"
    ) {
        return Err(format!(
            "cannot tell the format of {}: name it .toml, .yaml, .yml or .json",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(extension, &text).map_err(|e| format!("{}: {e}", path.display()))
}
