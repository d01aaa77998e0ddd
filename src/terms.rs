//! Terms of service (`[general] terms.path`), in Sydent's YAML format:
//!
//! ```yaml
//! master_version: "master_1_1"
//! docs:
//!   terms_of_service:
//!     version: "2.0"
//!     langs:
//!       en: {name: "Terms of Service", url: "https://example.org/terms-2.0-en.html"}
//! ```
//!
//! Read once at start (a bad file stops startup, naming it) and again on SIGHUP (a bad file then
//! keeps the terms in force and is logged), never per request as Sydent does. With no file there
//! are no terms and nothing is gated.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One version of the terms.
#[derive(Debug, Default)]
pub struct Terms {
    /// None: no terms configured.
    master_version: Option<String>,
    /// The body of `GET /terms`.
    policies: Value,
    /// Every document's URLs (all languages) → the document's id.
    url_docs: HashMap<String, String>,
    doc_count: usize,
}

#[derive(Deserialize)]
struct TermsFile {
    master_version: Scalar,
    #[serde(default)]
    docs: BTreeMap<String, DocFile>,
}

#[derive(Deserialize)]
struct DocFile {
    version: Scalar,
    langs: BTreeMap<String, LangFile>,
}

#[derive(Deserialize)]
struct LangFile {
    name: String,
    url: String,
}

/// A YAML scalar read as text: `version: 2.0` and `version: "2.0"` both mean "2.0".
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Integer(i) => i.to_string(),
            Self::Float(f) => format!("{f:?}"),
        }
    }
}

impl Terms {
    /// No terms: nothing is gated, `GET /terms` lists no policies.
    pub fn none() -> Self {
        Self {
            policies: json!({ "policies": {} }),
            ..Self::default()
        }
    }

    /// Reads and checks `path`; the error says what is wrong, for the caller to put after the
    /// file's name.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TermsFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let master_version = file.master_version.text();
        if master_version.is_empty() {
            return Err("master_version is empty".into());
        }
        let mut policies = Map::new();
        let mut url_docs = HashMap::new();
        for (doc_id, doc) in &file.docs {
            if doc.langs.is_empty() {
                return Err(format!("docs.{doc_id}.langs lists no language"));
            }
            let mut policy = Map::new();
            policy.insert("version".into(), Value::String(doc.version.text()));
            for (lang, entry) in &doc.langs {
                if !(entry.url.starts_with("https://") || entry.url.starts_with("http://")) {
                    return Err(format!(
                        "docs.{doc_id}.langs.{lang}.url '{}' is not an http(s) URL",
                        entry.url
                    ));
                }
                policy.insert(
                    lang.clone(),
                    json!({ "name": entry.name, "url": entry.url }),
                );
                url_docs.insert(entry.url.clone(), doc_id.clone());
            }
            policies.insert(doc_id.clone(), Value::Object(policy));
        }
        Ok(Self {
            master_version: Some(master_version),
            policies: json!({ "policies": policies }),
            url_docs,
            doc_count: file.docs.len(),
        })
    }

    /// The version an account must have agreed to; None when there are no terms.
    pub fn master_version(&self) -> Option<&str> {
        self.master_version.as_deref()
    }

    /// The body of `GET /terms`.
    pub fn policies(&self) -> &Value {
        &self.policies
    }

    /// The URLs in `urls` that belong to no document.
    pub fn unknown_urls<'a>(&self, urls: &'a [String]) -> Vec<&'a str> {
        urls.iter()
            .filter(|url| !self.url_docs.contains_key(url.as_str()))
            .map(String::as_str)
            .collect()
    }

    /// Does `accepted` hold at least one URL (any language) of every document?
    pub fn all_accepted<'a>(&self, accepted: impl IntoIterator<Item = &'a str>) -> bool {
        let mut docs: Vec<&str> = accepted
            .into_iter()
            .filter_map(|url| self.url_docs.get(url).map(String::as_str))
            .collect();
        docs.sort_unstable();
        docs.dedup();
        docs.len() == self.doc_count
    }
}

/// The terms in force, shared by the handlers and replaced on SIGHUP.
#[derive(Clone)]
pub struct SharedTerms(Arc<RwLock<Arc<Terms>>>);

impl SharedTerms {
    pub fn new(terms: Terms) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(terms))))
    }

    pub fn current(&self) -> Arc<Terms> {
        Arc::clone(&self.0.read().expect("terms lock"))
    }

    pub fn replace(&self, terms: Terms) {
        *self.0.write().expect("terms lock") = Arc::new(terms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
master_version: "master_1_1"
docs:
  terms_of_service:
    version: "2.0"
    langs:
      en:
        name: "Terms of Service"
        url: "https://example.org/somewhere/terms-2.0-en.html"
      fr:
        name: "Conditions d'utilisation"
        url: "https://example.org/somewhere/terms-2.0-fr.html"
  privacy_policy:
    version: 1.2
    langs:
      en:
        name: "Privacy Policy"
        url: "https://example.org/somewhere/privacy-1.2-en.html"
"#;

    #[test]
    fn sydents_sample_file_gives_the_spec_body() {
        let terms = Terms::parse(SAMPLE).unwrap();
        assert_eq!(terms.master_version(), Some("master_1_1"));
        assert_eq!(
            terms.policies(),
            &json!({"policies": {
                "terms_of_service": {
                    "version": "2.0",
                    "en": {"name": "Terms of Service", "url": "https://example.org/somewhere/terms-2.0-en.html"},
                    "fr": {"name": "Conditions d'utilisation", "url": "https://example.org/somewhere/terms-2.0-fr.html"},
                },
                "privacy_policy": {
                    "version": "1.2",
                    "en": {"name": "Privacy Policy", "url": "https://example.org/somewhere/privacy-1.2-en.html"},
                },
            }})
        );
    }

    #[test]
    fn every_document_must_be_accepted_in_some_language() {
        let terms = Terms::parse(SAMPLE).unwrap();
        let fr = "https://example.org/somewhere/terms-2.0-fr.html";
        let privacy = "https://example.org/somewhere/privacy-1.2-en.html";
        assert!(!terms.all_accepted([fr]));
        assert!(terms.all_accepted([fr, privacy]));
        assert!(!terms.all_accepted(["https://elsewhere.example/x", privacy]));
        let asked = vec![fr.to_string(), "https://elsewhere.example/x".to_string()];
        assert_eq!(terms.unknown_urls(&asked), ["https://elsewhere.example/x"]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, expected) in [
            ("docs: {}", "master_version"),
            ("master_version: v1\ndocs:\n  tos:\n    version: 1\n", "langs"),
            (
                "master_version: v1\ndocs:\n  tos:\n    version: 1\n    langs:\n      en: {name: x}\n",
                "url",
            ),
            (
                "master_version: v1\ndocs:\n  tos:\n    version: 1\n    langs:\n      en: {name: x, url: 'ftp://x'}\n",
                "not an http(s) URL",
            ),
            ("master_version: [", "line 2"),
        ] {
            let err = Terms::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        let none = Terms::none();
        assert_eq!(none.master_version(), None);
        assert_eq!(none.policies(), &json!({"policies": {}}));
    }
}
