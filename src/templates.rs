//! The email and page templates, laid out and rendered as Sydent does, so that an operator's
//! Sydent `res/` folder works unchanged.
//!
//! `templates.path` holds one folder per brand (`matrix-org`, `vector-im`, ...). A request may
//! name a brand (`?brand=`); an unknown one means `brand.default`. In a brand folder:
//! - `verification_template.eml`, `invite_template.eml`, `migration_template.eml`: whole RFC 5322
//!   messages, headers included. `<name>.j2` wins when it exists and is rendered with Jinja2's
//!   rules as Sydent configures them: autoescape on for every template (so headers and plain
//!   text say `|safe`), MarkupSafe's escaping, Jinja2's `urlencode`. Without a `.j2` the legacy
//!   file is filled by Python `%`-formatting, where every variable also exists as
//!   `<name>_forhtml` and `<name>_forurl` (except `multipart_boundary`).
//! - `verify_response_template.html`: the page of the emailed link, legacy `%(message)s`.
//!
//! The deprecated direct paths (`email.template`, `email.invite_template`,
//! `verify_response_template`) override every brand, as in Sydent.
//!
//! Everything is read and compiled once, in [`Templates::new`]: a missing or broken template
//! of the default brand stops the start with the file's name, and rendering touches no disk
//! (a Jinja `{% include %}` of another file is the exception: it is read on first use, then
//! kept). When `templates.path` has no folder for the default brand (the Docker image, a node
//! started from another directory), the templates of our own `res/matrix-org/`, compiled into
//! the binary, stand in for it.
//!
//! Variables of the built-in templates: those Sydent fills (see [`standard_email_vars`]; the
//! verification email adds `link`, `token`, `ipaddress`; the invite the store-invite
//! arguments, `token`, `ephemeral_private_key`, `bracketed_room_name`,
//! `bracketed_verified_sender`, `web_client_location`, `subject_header_value`; the migration
//! email `mxid`) and, for the invite, an optional `sign_url`: the complete sign-ed25519 URL,
//! token and private key in its query, passed to the web client as `signurl` when set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::crypto::{random_string, ALPHANUMERIC};
use minijinja::value::ValueKind;
use minijinja::{AutoEscape, Environment, Output, State, Value};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::Config;

/// The emails Sydent sends from templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TemplateKind {
    /// The link (and code) that validates an email address (requestToken).
    Verification,
    /// A third-party invite to a room or space (store-invite).
    Invite,
    /// The notice of Sydent's casefold migration that an address lost one of its bindings.
    Migration,
}

impl TemplateKind {
    pub const ALL: [TemplateKind; 3] = [Self::Verification, Self::Invite, Self::Migration];

    /// The file's name in a brand folder, without the `.j2` of its Jinja form.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Verification => "verification_template.eml",
            Self::Invite => "invite_template.eml",
            Self::Migration => "migration_template.eml",
        }
    }

    /// Our own Jinja template (`res/matrix-org/`), compiled into the binary.
    fn built_in(self) -> &'static str {
        match self {
            Self::Verification => include_str!("../res/matrix-org/verification_template.eml.j2"),
            Self::Invite => include_str!("../res/matrix-org/invite_template.eml.j2"),
            Self::Migration => include_str!("../res/matrix-org/migration_template.eml.j2"),
        }
    }
}

/// The page template's name in a brand folder.
const VERIFY_RESPONSE: &str = "verify_response_template.html";
const BUILT_IN_VERIFY_RESPONSE: &str =
    include_str!("../res/matrix-org/verify_response_template.html");
/// The names the built-in templates are compiled under (no brand folder can be named so by
/// accident, and `file` in an error says where they come from).
const BUILT_IN_PREFIX: &str = "(built-in res/matrix-org)";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read the template {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The default brand (or a deprecated direct path) lacks a template every node needs.
    #[error("the template {} does not exist{hint}", path.display())]
    Missing { path: PathBuf, hint: String },
    /// A Jinja template that does not compile, or failed while rendering.
    #[error("template {file}: {source}")]
    Jinja {
        file: String,
        source: minijinja::Error,
    },
    /// A legacy template whose `%`-formatting is not `%(name)s` or `%%`.
    #[error("template {file}: {message}")]
    Format { file: String, message: String },
    /// A legacy template names a variable this message does not have (Python's KeyError).
    #[error("template {file} uses %({key})s, which is not a variable of this message")]
    UnknownKey { file: String, key: String },
}

/// Where the templates are, as `sydent.conf` says.
#[derive(Debug, Clone)]
pub struct TemplatePaths {
    /// `templates.path`: the folder of brand folders.
    pub root: PathBuf,
    /// `brand.default`.
    pub default_brand: String,
    /// `email.template` (deprecated): the verification email, any brand.
    pub verification: Option<PathBuf>,
    /// `email.invite_template` (deprecated): the invite email, any brand.
    pub invite: Option<PathBuf>,
    /// `verify_response_template` (deprecated): the submitToken page, any brand.
    pub verify_response: Option<PathBuf>,
}

impl TemplatePaths {
    pub fn from_config(config: &Config) -> Self {
        Self {
            root: config.general.templates_path.clone(),
            default_brand: config.general.brand_default.clone(),
            verification: config.email.template.clone(),
            invite: config.email.invite_template.clone(),
            verify_response: config.http.verify_response_template.clone(),
        }
    }
}

/// One template, ready to render without touching the disk.
enum Loaded {
    /// Compiled into the environment under `name` (its path under `templates.path`, as
    /// Jinja2's loader names it), read from `file`.
    Jinja {
        name: String,
        file: String,
    },
    Legacy(LegacyTemplate),
}

/// The templates of one brand folder; a missing one falls back to the default brand's.
#[derive(Default)]
struct Brand {
    emails: BTreeMap<TemplateKind, Loaded>,
    verify_response: Option<LegacyTemplate>,
}

/// Every template of every brand, loaded once at start; immutable, shared in an `Arc`.
pub struct Templates {
    env: Environment<'static>,
    default_brand: String,
    /// Every folder of `templates.path`, and the default brand even when it is built in.
    brands: BTreeMap<String, Brand>,
    /// The deprecated direct paths, which beat every brand.
    email_overrides: BTreeMap<TemplateKind, Loaded>,
    verify_response_override: Option<LegacyTemplate>,
}

// Shared by every worker thread in an `Arc`.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Templates>();
};

impl Templates {
    /// Loads what `templates.path`, `brand.default` and the deprecated direct paths name.
    pub fn new(config: &Config) -> Result<Self, TemplateError> {
        Self::load(&TemplatePaths::from_config(config))
    }

    /// Loads every brand folder of `paths.root` and the direct paths; see the module's doc.
    pub fn load(paths: &TemplatePaths) -> Result<Self, TemplateError> {
        let mut env = jinja_environment(&paths.root);
        let mut brands = BTreeMap::new();
        for name in brand_folders(&paths.root) {
            let brand = load_brand(&mut env, &paths.root, &name)?;
            brands.insert(name, brand);
        }

        let mut email_overrides = BTreeMap::new();
        for (kind, path) in [
            (TemplateKind::Verification, &paths.verification),
            (TemplateKind::Invite, &paths.invite),
        ] {
            if let Some(path) = path {
                email_overrides.insert(kind, load_direct(&mut env, &paths.root, path)?);
            }
        }
        let verify_response_override = match &paths.verify_response {
            Some(path) => Some(load_verify_response(path, read(path)?)?),
            None => None,
        };

        let default = &paths.default_brand;
        match brands.get_mut(default) {
            Some(brand) => {
                let folder = paths.root.join(default);
                for kind in [TemplateKind::Verification, TemplateKind::Invite] {
                    if !brand.emails.contains_key(&kind) && !email_overrides.contains_key(&kind) {
                        return Err(missing(&folder, kind.file_name()));
                    }
                }
                if brand.verify_response.is_none() && verify_response_override.is_none() {
                    return Err(missing(&folder, VERIFY_RESPONSE));
                }
                // Sydent's own is-test brand has no migration template, and only the casefold
                // migration sends it: ours stands in rather than stopping the start.
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    brand.emails.entry(TemplateKind::Migration)
                {
                    log::warn!(
                        "{} has no {}: the built-in one is used",
                        folder.display(),
                        TemplateKind::Migration.file_name()
                    );
                    slot.insert(add_built_in(&mut env, TemplateKind::Migration)?);
                }
            }
            None => {
                log::warn!(
                    "templates.path '{}' has no folder for brand.default '{default}': the \
                     built-in templates are used",
                    paths.root.display()
                );
                brands.insert(default.clone(), built_in_brand(&mut env)?);
            }
        }

        Ok(Self {
            env,
            default_brand: default.clone(),
            brands,
            email_overrides,
            verify_response_override,
        })
    }

    /// The brand to use: `requested` if it is the name of a brand folder (exactly: no path),
    /// else `brand.default`.
    pub fn brand(&self, requested: Option<&str>) -> &str {
        requested
            .filter(|name| {
                !name.is_empty() && !name.contains(['/', '\\']) && *name != "." && *name != ".."
            })
            .and_then(|name| self.brands.get_key_value(name))
            .map_or(&self.default_brand, |(name, _)| name)
    }

    /// The whole RFC 5322 message (headers included) of `kind` in `brand` (an unknown brand
    /// means the default one), filled with `vars`.
    pub fn render_email(
        &self,
        brand: &str,
        kind: TemplateKind,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, TemplateError> {
        let template = self
            .email_overrides
            .get(&kind)
            .or_else(|| self.brands.get(brand)?.emails.get(&kind))
            .or_else(|| self.brands.get(&self.default_brand)?.emails.get(&kind))
            .expect("Templates::load gives the default brand every kind");
        match template {
            Loaded::Jinja { name, file } => {
                let jinja = |source| TemplateError::Jinja {
                    file: file.clone(),
                    source,
                };
                let compiled = self.env.get_template(name).map_err(jinja)?;
                compiled.render(Value::from(vars.clone())).map_err(jinja)
            }
            Loaded::Legacy(legacy) => legacy.render(|key| email_var(vars, key)),
        }
    }

    /// The page the emailed submitToken link shows, with `message` (no escaping: Sydent's
    /// messages are fixed strings).
    pub fn render_verify_response(
        &self,
        brand: &str,
        message: &str,
    ) -> Result<String, TemplateError> {
        let template = self
            .verify_response_override
            .as_ref()
            .or_else(|| self.brands.get(brand)?.verify_response.as_ref())
            .or_else(|| {
                self.brands
                    .get(&self.default_brand)?
                    .verify_response
                    .as_ref()
            })
            .expect("Templates::load gives the default brand a verify response page");
        template.render(|key| (key == "message").then_some(Cow::Borrowed(message)))
    }
}

/// Sydent's Jinja environment: `FileSystemLoader(templates.path)`, `autoescape=True`.
fn jinja_environment(root: &Path) -> Environment<'static> {
    let mut env = Environment::new();
    // Every template escapes, `.eml` too (Sydent's `autoescape=True`).
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_formatter(markupsafe_formatter);
    env.add_filter("escape", escape_filter);
    env.add_filter("e", escape_filter);
    env.add_filter("urlencode", urlencode_filter);
    // Only for `{% include %}` / `{% extends %}` of files we did not load: no `stat` per render.
    env.set_loader(minijinja::path_loader(root));
    env.set_auto_reload(false);
    env
}

/// The names of the folders in `root` (Sydent's valid brands); none when it does not exist.
fn brand_folders(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        // As Python's os.path.isdir: a symbolic link to a folder counts.
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

fn load_brand(
    env: &mut Environment<'static>,
    root: &Path,
    name: &str,
) -> Result<Brand, TemplateError> {
    let folder = root.join(name);
    let mut brand = Brand::default();
    for kind in TemplateKind::ALL {
        let jinja = folder.join(format!("{}.j2", kind.file_name()));
        let legacy = folder.join(kind.file_name());
        let loaded = if jinja.exists() {
            let name = format!("{name}/{}.j2", kind.file_name());
            add_jinja(env, name, &jinja, read(&jinja)?)?
        } else if legacy.exists() {
            Loaded::Legacy(LegacyTemplate::parse(&legacy, read(&legacy)?)?)
        } else {
            continue;
        };
        brand.emails.insert(kind, loaded);
    }
    let page = folder.join(VERIFY_RESPONSE);
    if page.exists() {
        brand.verify_response = Some(load_verify_response(&page, read(&page)?)?);
    }
    Ok(brand)
}

/// A deprecated direct path. As Sydent: a `.j2` name goes through the Jinja loader, so it is
/// looked up under `templates.path` (leading `/` ignored, `..` refused); anything else is a
/// legacy file opened as written. A `.j2` path that is not under `templates.path` but exists
/// as written is taken too (Sydent would fail on it when sending).
fn load_direct(
    env: &mut Environment<'static>,
    root: &Path,
    path: &Path,
) -> Result<Loaded, TemplateError> {
    let text = path.to_string_lossy();
    if !text.ends_with(".j2") {
        return Ok(Loaded::Legacy(LegacyTemplate::parse(path, read(path)?)?));
    }
    let under_root = jinja_loader_path(root, &text);
    let file = match under_root {
        Some(ref file) if file.exists() => file.as_path(),
        _ if path.exists() => path,
        _ => {
            return Err(TemplateError::Missing {
                path: under_root.unwrap_or_else(|| path.to_path_buf()),
                hint: format!(
                    " (a .j2 email.template or email.invite_template is a name under \
                     templates.path '{}')",
                    root.display()
                ),
            })
        }
    };
    add_jinja(env, text.into_owned(), file, read(file)?)
}

/// Where Jinja2's `FileSystemLoader(root)` finds `name`: split at `/`, empty and `.` pieces
/// dropped, `..` refused.
fn jinja_loader_path(root: &Path, name: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for piece in name.split('/') {
        match piece {
            "" | "." => {}
            ".." => return None,
            piece => path.push(piece),
        }
    }
    Some(path)
}

fn add_jinja(
    env: &mut Environment<'static>,
    name: String,
    file: &Path,
    source: String,
) -> Result<Loaded, TemplateError> {
    let file = file.display().to_string();
    env.add_template_owned(name.clone(), source)
        .map_err(|source| TemplateError::Jinja {
            file: file.clone(),
            source,
        })?;
    Ok(Loaded::Jinja { name, file })
}

fn add_built_in(
    env: &mut Environment<'static>,
    kind: TemplateKind,
) -> Result<Loaded, TemplateError> {
    let name = format!("{BUILT_IN_PREFIX}/{}.j2", kind.file_name());
    add_jinja(
        env,
        name.clone(),
        Path::new(&name),
        normalise_newlines(kind.built_in()),
    )
}

/// Our own `res/matrix-org`, from the binary.
fn built_in_brand(env: &mut Environment<'static>) -> Result<Brand, TemplateError> {
    let mut brand = Brand::default();
    for kind in TemplateKind::ALL {
        brand.emails.insert(kind, add_built_in(env, kind)?);
    }
    brand.verify_response = Some(load_verify_response(
        Path::new(&format!("{BUILT_IN_PREFIX}/{VERIFY_RESPONSE}")),
        BUILT_IN_VERIFY_RESPONSE.to_string(),
    )?);
    Ok(brand)
}

/// The submitToken page: legacy formatting with `message` as its only variable.
fn load_verify_response(path: &Path, source: String) -> Result<LegacyTemplate, TemplateError> {
    let template = LegacyTemplate::parse(path, source)?;
    if let Some(key) = template.keys().find(|key| *key != "message") {
        return Err(TemplateError::UnknownKey {
            file: template.file.clone(),
            key: key.to_string(),
        });
    }
    Ok(template)
}

/// A template file's text, line ends as Python and Jinja2 read them.
fn read(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path)
        .map(|text| normalise_newlines(&text))
        .map_err(|source| TemplateError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// `\r\n` and `\r` become `\n`, as Python's text files (legacy) and Jinja2's lexer do.
fn normalise_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

fn missing(folder: &Path, file: &str) -> TemplateError {
    TemplateError::Missing {
        path: folder.join(file),
        hint: format!(" (nor {file}.j2), and brand.default needs it"),
    }
}

/// A variable of a legacy email: itself, or `<name>_forhtml` / `<name>_forurl` made from it
/// (except `multipart_boundary`, as Sydent).
fn email_var<'a>(vars: &'a BTreeMap<String, String>, key: &str) -> Option<Cow<'a, str>> {
    if let Some(value) = vars.get(key) {
        return Some(Cow::Borrowed(value));
    }
    let derived = |suffix: &str| {
        let base = key.strip_suffix(suffix)?;
        (base != "multipart_boundary").then(|| vars.get(base))?
    };
    if let Some(value) = derived("_forhtml") {
        return Some(Cow::Owned(python_html_escape(value)));
    }
    derived("_forurl").map(|value| Cow::Owned(url_quote(value, PATH_SAFE).into_owned()))
}

/// A legacy template, parsed: Python's `text % mapping` limited to `%(name)s` and `%%`.
struct LegacyTemplate {
    file: String,
    parts: Vec<Part>,
}

enum Part {
    Text(String),
    Var(String),
}

impl LegacyTemplate {
    fn parse(path: &Path, source: String) -> Result<Self, TemplateError> {
        let file = path.display().to_string();
        let error = |offset: usize, what: &str| TemplateError::Format {
            file: file.clone(),
            message: format!(
                "{what} at byte {offset} (legacy templates know only %(name)s and %%; \
                 a literal % is written %%)"
            ),
        };
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source.as_str();
        while let Some(at) = rest.find('%') {
            let offset = source.len() - rest.len() + at;
            text.push_str(&rest[..at]);
            rest = &rest[at + 1..];
            if let Some(after) = rest.strip_prefix('%') {
                text.push('%');
                rest = after;
                continue;
            }
            let Some(after) = rest.strip_prefix('(') else {
                return Err(error(offset, "a % that is not %(name)s"));
            };
            // Python matches parentheses inside the key: `%(a(b)c)s` names `a(b)c`.
            let mut depth = 1;
            let close = after.char_indices().find_map(|(i, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(i)
            });
            let Some(close) = close else {
                return Err(error(offset, "an unclosed %("));
            };
            let Some(after_key) = after[close + 1..].strip_prefix('s') else {
                return Err(error(offset, "a conversion other than s"));
            };
            parts.push(Part::Text(std::mem::take(&mut text)));
            parts.push(Part::Var(after[..close].to_string()));
            rest = after_key;
        }
        text.push_str(rest);
        parts.push(Part::Text(text));
        Ok(Self { file, parts })
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Var(key) => Some(key.as_str()),
            Part::Text(_) => None,
        })
    }

    fn render<'a>(
        &self,
        lookup: impl Fn(&str) -> Option<Cow<'a, str>>,
    ) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Var(key) => {
                    out.push_str(&lookup(key).ok_or_else(|| TemplateError::UnknownKey {
                        file: self.file.clone(),
                        key: key.clone(),
                    })?)
                }
            }
        }
        Ok(out)
    }
}

/// Python's `urllib.parse.quote(s)` (and Jinja2's `urlencode` of a string): letters, digits,
/// `_.-~` and `/` stay, the rest is %-encoded UTF-8 with upper-case hex.
const PATH_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~')
    .remove(b'/');
/// Jinja2's `urlencode` of the keys and values of a mapping: `/` is encoded too.
const QUERY_SAFE: &AsciiSet = &PATH_SAFE.add(b'/');

fn url_quote<'a>(text: &'a str, safe: &'static AsciiSet) -> Cow<'a, str> {
    utf8_percent_encode(text, safe).into()
}

/// Python's `html.escape(s, quote=True)`, the `_forhtml` variables of legacy templates.
fn python_html_escape(text: &str) -> String {
    escape_with(text, "&#x27;", "&quot;")
}

/// MarkupSafe's `escape`, which Jinja2's autoescape uses.
fn markupsafe_escape(text: &str) -> String {
    escape_with(text, "&#39;", "&#34;")
}

fn escape_with(text: &str, apostrophe: &str, quote: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str(apostrophe),
            '"' => out.push_str(quote),
            c => out.push(c),
        }
    }
    out
}

/// Python's `str()` of a value, as Jinja2 prints it (`None`, `True`; undefined prints nothing).
fn python_str(value: &Value) -> Cow<'_, str> {
    match value.kind() {
        ValueKind::Undefined => Cow::Borrowed(""),
        ValueKind::None => Cow::Borrowed("None"),
        ValueKind::Bool if value.is_true() => Cow::Borrowed("True"),
        ValueKind::Bool => Cow::Borrowed("False"),
        _ => match value.as_str() {
            Some(text) => Cow::Borrowed(text),
            None => Cow::Owned(value.to_string()),
        },
    }
}

/// Prints `{{ value }}` as Jinja2 with `autoescape=True` does: safe strings as they are,
/// everything else escaped MarkupSafe's way (minijinja's own escaping differs: `&#x27;`,
/// `&quot;`, and `/` as `&#x2f;`).
fn markupsafe_formatter(
    out: &mut Output,
    state: &mut State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let text = python_str(value);
    let escaped = match state.auto_escape() {
        AutoEscape::None => text,
        _ if value.is_safe() => text,
        _ => Cow::Owned(markupsafe_escape(&text)),
    };
    out.write_str(&escaped).map_err(minijinja::Error::from)
}

/// `|escape` / `|e`, MarkupSafe's way.
fn escape_filter(value: &Value) -> Value {
    if value.is_safe() {
        return value.clone();
    }
    Value::from_safe_string(markupsafe_escape(&python_str(value)))
}

/// Jinja2's `urlencode`: a string (or any single value) is quoted keeping `/`; a mapping or a
/// sequence of pairs becomes `k=v&...`, each side quoted with `/` encoded and spaces as `+`.
fn urlencode_filter(value: &Value) -> Result<String, minijinja::Error> {
    let pairs: Vec<(Value, Value)> = match value.kind() {
        ValueKind::Map => value
            .try_iter()?
            .map(|key| {
                let item = value.get_item(&key)?;
                Ok((key, item))
            })
            .collect::<Result<_, minijinja::Error>>()?,
        ValueKind::Seq | ValueKind::Iterable => value
            .try_iter()?
            .map(|pair| Ok((pair.get_item_by_index(0)?, pair.get_item_by_index(1)?)))
            .collect::<Result<_, minijinja::Error>>()?,
        _ => return Ok(url_quote(&python_str(value), PATH_SAFE).into_owned()),
    };
    let for_query = |v: &Value| url_quote(&python_str(v), QUERY_SAFE).replace("%20", "+");
    Ok(pairs
        .iter()
        .map(|(key, item)| format!("{}={}", for_query(key), for_query(item)))
        .collect::<Vec<_>>()
        .join("&"))
}

/// Python's `template % vars` for `%(name)s` and `%%` (e.g. Sydent's invite subjects); a
/// name `vars` lacks is an error naming it.
pub fn percent_format(
    what: &str,
    template: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    LegacyTemplate::parse(Path::new(what), template.to_string())?
        .render(|key| vars.get(key).map(|v| Cow::Borrowed(v.as_str())))
}

/// A header value as RFC 2047 encoded words (UTF-8, folded), what Sydent's
/// `Header(value, "utf8").encode()` gives its invite subjects: any text, line breaks included,
/// is safe in a header this way. `header_len` is the length of `Name: ` before it.
pub fn encoded_header_value(value: &str, header_len: usize) -> String {
    let mut out = String::new();
    {
        let mut writer =
            email_encoding::headers::writer::EmailWriter::new(&mut out, header_len, 0, false);
        // Writing into a String cannot fail.
        let _ = email_encoding::headers::rfc2047::encode(value, &mut writer);
    }
    out
}

/// The variables Sydent adds to every email: `messageid` (`<{ms}{16 letters}@{hostname}>`),
/// `date` (RFC 2822 in UTC, as Python's `email.utils.formatdate()`), `to`, `from` and
/// `multipart_boundary` (32 letters and digits, so user input cannot end a MIME part). Insert
/// them after the message's own variables: they win over request arguments of the same name,
/// as in Sydent.
pub fn standard_email_vars(
    hostname: &str,
    from: &str,
    to: &str,
    now_ms: i64,
) -> BTreeMap<String, String> {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    BTreeMap::from([
        (
            "messageid".to_string(),
            format!("<{now_ms}{}@{hostname}>", random_string(LETTERS, 16)),
        ),
        ("date".to_string(), email_date(now_ms)),
        ("to".to_string(), to.to_string()),
        ("from".to_string(), from.to_string()),
        (
            "multipart_boundary".to_string(),
            random_string(ALPHANUMERIC, 32),
        ),
    ])
}

/// Python's `email.utils.formatdate(localtime=False)`: `Thu, 03 Dec 2026 10:41:14 -0000`
/// (seconds truncated; `-0000` is what Python writes for UTC).
fn email_date(now_ms: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} -0000",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn paths(root: &Path) -> TemplatePaths {
        TemplatePaths {
            root: root.to_path_buf(),
            default_brand: "matrix-org".into(),
            verification: None,
            invite: None,
            verify_response: None,
        }
    }

    /// A templates.path with the given files (`brand/name` → text).
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    const PAGE: (&str, &str) = (
        "matrix-org/verify_response_template.html",
        "<p>%(message)s</p>",
    );

    #[test]
    fn escaping_is_markupsafe_s() {
        let dir = tree(&[
            (
                "matrix-org/verification_template.eml.j2",
                "{{ link }}|{{ link|safe }}|{{ link|e }}|{{ none }}|{{ nothing }}",
            ),
            (
                "matrix-org/invite_template.eml.j2",
                "{{ token|urlencode }}|{{ pairs|urlencode }}",
            ),
            PAGE,
        ]);
        let templates = Templates::load(&paths(dir.path())).unwrap();
        let out = templates
            .render_email(
                "matrix-org",
                TemplateKind::Verification,
                &vars(&[("link", r#"a/b?x=1&y='2' "q" <t>"#)]),
            )
            .unwrap();
        assert_eq!(
            out,
            "a/b?x=1&amp;y=&#39;2&#39; &#34;q&#34; &lt;t&gt;|a/b?x=1&y='2' \"q\" <t>|\
             a/b?x=1&amp;y=&#39;2&#39; &#34;q&#34; &lt;t&gt;|None|"
        );
    }

    #[test]
    fn urlencode_is_jinja2_s() {
        let env = jinja_environment(Path::new("/nonexistent"));
        let render = |source: &str, value: Value| {
            env.render_str(source, minijinja::context! { v => value })
                .unwrap()
        };
        assert_eq!(
            render(
                "{{ v|urlencode }}",
                Value::from("a/b c~d_e.f-g&h=i+j?k:l@m'n\"o…")
            ),
            "a/b%20c~d_e.f-g%26h%3Di%2Bj%3Fk%3Al%40m%27n%22o%E2%80%A6"
        );
        assert_eq!(
            render(
                "{{ v|urlencode }}",
                Value::from(BTreeMap::from([("a b", "c/d"), ("e", "f&")]))
            ),
            "a+b=c%2Fd&amp;e=f%26"
        );
        assert_eq!(render("{{ v|urlencode }}", Value::UNDEFINED), "");
    }

    #[test]
    fn legacy_formatting_has_forhtml_and_forurl() {
        let dir = tree(&[
            (
                "matrix-org/verification_template.eml",
                "%(link)s %(link_forhtml)s %(link_forurl)s 100%% %(multipart_boundary)s %(a(b)c)s",
            ),
            (
                "matrix-org/invite_template.eml",
                "%(multipart_boundary_forhtml)s",
            ),
            PAGE,
        ]);
        let templates = Templates::load(&paths(dir.path())).unwrap();
        let v = vars(&[
            ("link", r#"/x?a='1'&b="2" <é>"#),
            ("multipart_boundary", "B"),
            ("a(b)c", "paren"),
        ]);
        let out = templates
            .render_email("matrix-org", TemplateKind::Verification, &v)
            .unwrap();
        assert_eq!(
            out,
            "/x?a='1'&b=\"2\" <é> /x?a=&#x27;1&#x27;&amp;b=&quot;2&quot; &lt;é&gt; \
             /x%3Fa%3D%271%27%26b%3D%222%22%20%3C%C3%A9%3E 100% B paren"
        );
        let err = templates
            .render_email("matrix-org", TemplateKind::Invite, &v)
            .unwrap_err();
        assert!(
            matches!(&err, TemplateError::UnknownKey { key, file } if key == "multipart_boundary_forhtml" && file.ends_with("invite_template.eml")),
            "{err}"
        );
        assert_eq!(
            templates
                .render_verify_response("matrix-org", "Done & 100%")
                .unwrap(),
            "<p>Done & 100%</p>"
        );
    }

    #[test]
    fn legacy_formatting_refuses_what_python_would_not_fill_as_text() {
        for bad in ["50% off", "%(x)d", "%(x", "end %", "%s"] {
            let err = LegacyTemplate::parse(Path::new("t.eml"), bad.into()).err();
            assert!(matches!(err, Some(TemplateError::Format { .. })), "{bad}");
        }
    }

    #[test]
    fn brand_is_a_folder_name_or_the_default() {
        let dir = tree(&[("vector-im/verification_template.eml.j2", "vector {{ to }}")]);
        let templates = Templates::load(&paths(dir.path())).unwrap();
        assert_eq!(templates.brand(Some("vector-im")), "vector-im");
        for other in [
            None,
            Some(""),
            Some("unknown"),
            Some("../x"),
            Some("vector-im/"),
            Some(".."),
            Some("/tmp"),
        ] {
            assert_eq!(templates.brand(other), "matrix-org", "{other:?}");
        }
        let to = vars(&[("to", "a@b")]);
        let vector = templates
            .render_email("vector-im", TemplateKind::Verification, &to)
            .unwrap();
        assert_eq!(vector, "vector a@b");
        // vector-im has no invite template: the default brand's (here the built-in) stands in.
        let invite = templates
            .render_email("vector-im", TemplateKind::Invite, &to)
            .unwrap();
        assert!(invite.contains("To: a@b\n"), "{invite}");
    }

    #[test]
    fn without_a_default_brand_folder_the_built_in_templates_serve() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::load(&paths(&dir.path().join("absent"))).unwrap();
        assert_eq!(templates.brand(Some("matrix-org")), "matrix-org");
        let mut v = vars(&[
            ("link", "https://id.example/_matrix/identity/api/v1/validate/email/submitToken?token=T&sid=1"),
            ("token", "T0k3n"),
            ("ipaddress", "192.0.2.1"),
        ]);
        v.extend(standard_email_vars(
            "id.example",
            "Id <noreply@id.example>",
            "alice@example.org",
            0,
        ));
        let mail = templates
            .render_email("matrix-org", TemplateKind::Verification, &v)
            .unwrap();
        assert!(
            mail.starts_with(
                "Date: Thu, 01 Jan 1970 00:00:00 -0000\nFrom: Id <noreply@id.example>\n"
            ),
            "{mail}"
        );
        assert!(mail.contains("\n\nhttps://id.example/_matrix/identity/api/v1/validate/email/submitToken?token=T&sid=1\n"));
        assert!(mail.contains("href=\"https://id.example/_matrix/identity/api/v1/validate/email/submitToken?token=T&amp;sid=1\""));
        assert!(mail.contains("the code is T0k3n"));
        assert!(
            mail.ends_with(&format!("--{}--", v["multipart_boundary"])),
            "{mail}"
        );
        let page = templates
            .render_verify_response("other", "It worked")
            .unwrap();
        assert!(page.contains("<p>It worked</p>"));
    }

    #[test]
    fn a_default_brand_without_a_needed_template_stops_the_start() {
        let dir = tree(&[("matrix-org/invite_template.eml.j2", "x"), PAGE]);
        let err = Templates::load(&paths(dir.path())).err().unwrap();
        assert!(
            err.to_string()
                .contains("matrix-org/verification_template.eml"),
            "{err}"
        );
        let dir = tree(&[
            ("matrix-org/verification_template.eml.j2", "{% if %}"),
            ("matrix-org/invite_template.eml.j2", "x"),
            PAGE,
        ]);
        let err = Templates::load(&paths(dir.path())).err().unwrap();
        assert!(
            err.to_string()
                .contains("matrix-org/verification_template.eml.j2"),
            "{err}"
        );
    }

    #[test]
    fn direct_paths_beat_brands() {
        let dir = tree(&[
            ("matrix-org/verification_template.eml.j2", "brand"),
            ("matrix-org/invite_template.eml.j2", "brand"),
            PAGE,
            ("direct/verify.eml.j2", "direct jinja {{ to }}"),
            ("legacy.eml", "direct legacy %(to_forurl)s"),
            ("page.html", "page %(message)s"),
        ]);
        let mut p = paths(dir.path());
        // A .j2 path is a name under templates.path, as Jinja2's loader reads it.
        p.verification = Some(PathBuf::from("/direct/verify.eml.j2"));
        p.invite = Some(dir.path().join("legacy.eml"));
        p.verify_response = Some(dir.path().join("page.html"));
        let templates = Templates::load(&p).unwrap();
        let to = vars(&[("to", "a b@c")]);
        let render = |kind| templates.render_email("matrix-org", kind, &to).unwrap();
        assert_eq!(render(TemplateKind::Verification), "direct jinja a b@c");
        assert_eq!(render(TemplateKind::Invite), "direct legacy a%20b%40c");
        assert_eq!(
            templates.render_verify_response("matrix-org", "m").unwrap(),
            "page m"
        );
    }

    #[test]
    fn standard_vars_look_like_sydent_s() {
        let v = standard_email_vars("id.example", "from", "to", 1_796_294_474_999);
        assert_eq!(v["date"], "Thu, 03 Dec 2026 10:41:14 -0000");
        let id = &v["messageid"];
        let middle = id
            .strip_prefix("<1796294474999")
            .and_then(|s| s.strip_suffix("@id.example>"))
            .unwrap();
        assert!(middle.len() == 16 && middle.bytes().all(|b| b.is_ascii_alphabetic()));
        let boundary = &v["multipart_boundary"];
        assert!(boundary.len() == 32 && boundary.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!((v["to"].as_str(), v["from"].as_str()), ("to", "from"));
        assert_eq!(
            email_date(951_782_400_000),
            "Tue, 29 Feb 2000 00:00:00 -0000"
        );
        assert_eq!(email_date(-1), "Wed, 31 Dec 1969 23:59:59 -0000");
    }
}
