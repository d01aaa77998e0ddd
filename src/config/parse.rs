//! The ConfigParser semantics configparser lacks: `[DEFAULT]` fallback, BasicInterpolation,
//! Python's booleans, and editing the key line in place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use configparser::ini::Ini;

use super::keys::{self, KeyDef};
use super::{default_value, ConfigError};

type Sections = BTreeMap<String, BTreeMap<String, Option<String>>>;

/// The file as parsed: lower-cased section and key names, values as written.
pub struct RawConfig {
    sections: Sections,
}

impl RawConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ini = Ini::new();
        let mut defaults = ini.defaults();
        defaults.default_section = "default".into();
        // Python's ConfigParser: no inline comments, indented lines continue a value.
        defaults.enable_inline_comments = false;
        defaults.multiline = true;
        ini.load_defaults(defaults);
        let map = ini
            .read(text.to_string())
            .map_err(|e| format!("cannot parse: {e}"))?;
        Ok(Self {
            sections: map
                .into_iter()
                .map(|(s, keys)| (s, keys.into_iter().collect()))
                .collect(),
        })
    }

    /// The value written in `section` itself (not `[DEFAULT]`).
    pub fn value(&self, section: &str, key: &str) -> Option<String> {
        self.sections.get(section)?.get(key).cloned().flatten()
    }

    pub fn sections(&self) -> Vec<String> {
        self.sections
            .keys()
            .filter(|s| *s != "default")
            .cloned()
            .collect()
    }

    /// Keys set in `section` or in `[DEFAULT]` (which applies to every section).
    pub fn keys_with_defaults(&self, section: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .sections
            .get(section)
            .into_iter()
            .chain(self.sections.get("default"))
            .flat_map(|keys| keys.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// A warning for every key or section this node does not read.
    pub fn unknown_keys(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (section, entries) in &self.sections {
            let known_section = section == "default"
                || section.starts_with("peer.")
                || keys::SECTIONS.iter().any(|(s, _)| s == section);
            if !known_section {
                warnings.push(format!("config: unknown section [{section}] (ignored)"));
                continue;
            }
            for name in entries.keys() {
                if !keys::is_known(section, name) {
                    warnings.push(format!("config: unknown key [{section}] {name} (ignored)"));
                }
            }
        }
        warnings
    }
}

/// Typed reads with Sydent's lookup order and interpolation.
pub struct Reader<'a> {
    pub raw: &'a RawConfig,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    /// Section, else `[DEFAULT]`, else the built-in default for this key (or, as Sydent puts
    /// every default into `[DEFAULT]`, for a key of that name in any section).
    fn lookup(&self, section: &str, key: &str) -> Option<String> {
        if let Some(v) = self.raw.value(section, key) {
            return Some(v);
        }
        if let Some(v) = self.raw.value("default", key) {
            return Some(v);
        }
        keys::find(section, key)
            .or_else(|| keys::KEYS.iter().find(|k| k.name == key))
            .map(|k| default_value(k, self.env))
    }

    fn def(&self, section: &str, key: &str) -> Option<&'static KeyDef> {
        keys::find(section, key)
    }

    /// The interpolated string value. Raw keys skip interpolation.
    pub fn string(&self, section: &str, key: &str) -> Result<String, ConfigError> {
        let value = self.lookup(section, key).unwrap_or_default();
        if self.def(section, key).is_some_and(|k| k.raw) {
            return Ok(value);
        }
        self.interpolate(section, key, &value, 0)
    }

    fn interpolate(
        &self,
        section: &str,
        key: &str,
        value: &str,
        depth: usize,
    ) -> Result<String, ConfigError> {
        if depth > 10 {
            return Err(ConfigError::invalid(
                section,
                key,
                "interpolation nests too deep (a loop?)",
            ));
        }
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = rest.find('%') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(after) = after.strip_prefix('%') {
                out.push('%');
                rest = after;
            } else if let Some(inner) = after.strip_prefix('(') {
                let close = inner.find(")s").ok_or_else(|| {
                    ConfigError::invalid(
                        section,
                        key,
                        "'%(' without ')s'; write %% for a literal %",
                    )
                })?;
                let name = inner[..close].to_lowercase();
                let referenced = self.lookup(section, &name).ok_or_else(|| {
                    ConfigError::invalid(
                        section,
                        key,
                        format!("%({name})s refers to a key that is not set"),
                    )
                })?;
                out.push_str(&self.interpolate(section, key, &referenced, depth + 1)?);
                rest = &inner[close + 2..];
            } else {
                return Err(ConfigError::invalid(
                    section,
                    key,
                    "a '%' must be '%%' or '%(name)s'",
                ));
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// ConfigParser's booleans: 1/yes/true/on and 0/no/false/off, any case.
    pub fn boolean(&self, section: &str, key: &str) -> Result<bool, ConfigError> {
        let value = self.string(section, key)?;
        match value.trim().to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" | "on" => Ok(true),
            "0" | "no" | "false" | "off" => Ok(false),
            _ => Err(ConfigError::invalid(
                section,
                key,
                format!("'{value}' is not true or false"),
            )),
        }
    }

    pub fn number<T: FromStr>(&self, section: &str, key: &str) -> Result<T, ConfigError> {
        let value = self.string(section, key)?;
        value.trim().parse().map_err(|_| {
            ConfigError::invalid(section, key, format!("'{value}' is not a whole number"))
        })
    }

    pub fn port(&self, section: &str, key: &str) -> Result<u16, ConfigError> {
        let value = self.string(section, key)?;
        value.trim().parse().map_err(|_| {
            ConfigError::invalid(
                section,
                key,
                format!("'{value}' is not a port number (0-65535)"),
            )
        })
    }

    /// A rate in events per second: a number or a fraction such as `1/300`.
    pub fn rate(&self, section: &str, key: &str) -> Result<f64, ConfigError> {
        let value = self.string(section, key)?;
        let text = value.trim();
        let parsed = match text.split_once('/') {
            Some((n, d)) => match (n.trim().parse::<f64>(), d.trim().parse::<f64>()) {
                (Ok(n), Ok(d)) if d != 0.0 => Some(n / d),
                _ => None,
            },
            None => text.parse::<f64>().ok(),
        };
        match parsed {
            Some(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
            _ => Err(ConfigError::invalid(
                section,
                key,
                format!("'{value}' is not a positive rate (like 0.5 or 1/300)"),
            )),
        }
    }
}

/// Writes a file only its owner can read: it holds the signing key.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("conf.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// `text` with `ed25519.signingkey = <key>` in its `[crypto]` section: an existing empty
/// line is replaced, else the line goes right after the section header, else a `[crypto]`
/// section is appended. Nothing else in the file changes.
pub fn with_signing_key(text: &str, key: &str) -> String {
    let line = format!("ed25519.signingkey = {key}");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let header = |l: &str| {
        let t = l.trim();
        t.starts_with('[') && t.ends_with(']')
    };
    let crypto = lines.iter().position(|l| {
        header(l)
            && l.trim()[1..l.trim().len() - 1]
                .trim()
                .eq_ignore_ascii_case("crypto")
    });
    match crypto {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|l| header(l))
                .map_or(lines.len(), |i| start + 1 + i);
            let existing = (start + 1..end).find(|&i| {
                let l = &lines[i];
                l.split_once(['=', ':'])
                    .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("ed25519.signingkey"))
            });
            match existing {
                Some(i) => lines[i] = line,
                None => lines.insert(start + 1, line),
            }
        }
        None => {
            lines.push(String::new());
            lines.push("[crypto]".into());
            lines.push(line);
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}
