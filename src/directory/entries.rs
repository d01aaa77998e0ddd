//! What directory entries mean as bindings. Pure: [`super::ldap`] hands over each entry's raw
//! values ([`DirectoryEntry`]) and gets bindings back ([`BindingsBuilder`]).
//!
//! - An email value is casefolded and checked as this node stores emails
//!   ([`Threepid::parse`]); a phone value loses its spaces, hyphens, dots, parentheses and
//!   leading `+` (`+1 (555) 123-4567` → `15551234567`, the Matrix msisdn) and must then be
//!   E.164 digits. Other values (`0171 …` in national form, `ext. 12`) are counted and left out.
//! - The Matrix ID is `@<id_attr value>:<hs_name>`, or the value itself when `hs_name` is
//!   unset, lowercased (as the slipeer fork does), and must parse as a [`Mxid`]; an entry
//!   without one is skipped, with a warning naming its DN. With several id values, the first
//!   the server returns is used, as in the fork.
//! - An address that entries with **different** Matrix IDs hold is ambiguous: no binding, and
//!   it is reported with the DNs of every entry holding it. Entries that agree on the Matrix
//!   ID (one person listed twice) still give the binding.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{Medium, Mxid, Threepid};

/// One address the directory answers for, in this node's form (casefolded email, msisdn
/// digits), and the Matrix ID it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirectoryBinding {
    pub medium: Medium,
    pub address: String,
    pub mxid: String,
}

impl DirectoryBinding {
    pub fn new(medium: Medium, address: impl Into<String>, mxid: impl Into<String>) -> Self {
        Self {
            medium,
            address: address.into(),
            mxid: mxid.into(),
        }
    }
}

/// What a search of the directory found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectorySnapshot {
    /// One per address, sorted by medium, then address.
    pub bindings: Vec<DirectoryBinding>,
    /// Addresses that entries with different Matrix IDs hold, each with the DNs of all the
    /// entries holding it (sorted). They are not in `bindings`; the caller warns about each
    /// once (a sync finds them again every time).
    pub ambiguous: Vec<(Medium, String, Vec<String>)>,
    /// Entries left out because their id attribute is missing or makes no valid Matrix ID
    /// (each was warned about with its DN).
    pub skipped: usize,
    /// Values of the email and msisdn attributes that are no usable address, left out.
    pub unusable_values: usize,
}

/// An entry as a search returned it: its DN and the raw values of the attributes that matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub dn: String,
    /// The id attribute's values.
    pub ids: Vec<String>,
    /// The values of every email attribute.
    pub emails: Vec<String>,
    /// The values of every msisdn attribute.
    pub phones: Vec<String>,
}

/// A directory's email value as this node stores it (casefolded), if it is a valid address.
pub fn email_address(raw: &str) -> Option<String> {
    Threepid::parse("email", raw.trim()).ok().map(|t| t.address)
}

/// A directory's phone value as a Matrix msisdn: `+1 555-123-4567` → `15551234567`.
/// Spaces, hyphens (RFC 4518's and the other dashes), dots and parentheses are dropped, then
/// one leading `+`; what is left must be E.164 digits.
pub fn msisdn_address(raw: &str) -> Option<String> {
    let kept: String = raw.chars().filter(|&c| !is_phone_separator(c)).collect();
    Threepid::parse("msisdn", &kept).ok().map(|t| t.address)
}

fn is_phone_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '.'
                | '('
                | ')'
                | '\u{058A}' // Armenian hyphen
                | '\u{2010}'
                ..='\u{2015}' // hyphen, non-breaking hyphen, figure dash .. bar
                | '\u{2212}' // minus sign
                | '\u{FE63}' // small hyphen-minus
                | '\u{FF0D}' // fullwidth hyphen-minus
        )
}

/// The Matrix ID an id attribute value names: `@<id>:<hs_name>`, or `id` itself when
/// `hs_name` is unset or empty, lowercased; `Err` with the candidate when that is no valid
/// Matrix ID.
pub fn mxid_for(id: &str, hs_name: Option<&str>) -> Result<String, String> {
    let id = id.trim();
    let candidate = match hs_name.map(str::trim).filter(|hs| !hs.is_empty()) {
        Some(hs) => format!("@{id}:{hs}"),
        None => id.to_owned(),
    }
    .to_lowercase();
    match Mxid::parse(&candidate) {
        Ok(_) if !id.is_empty() => Ok(candidate),
        _ => Err(candidate),
    }
}

/// Collects entries as a search streams them and judges ambiguity once all are in.
pub struct BindingsBuilder {
    hs_name: Option<String>,
    id_attr: String,
    /// `Warn` for a full sync (once per sync is fine), `Debug` for live lookups, which may
    /// meet the same bad entry on every request.
    level: log::Level,
    holders: BTreeMap<(Medium, String), BTreeSet<(String, String)>>,
    skipped: usize,
    unusable_values: usize,
    first_unusable: Option<String>,
}

impl BindingsBuilder {
    pub fn new(hs_name: Option<&str>, id_attr: &str, level: log::Level) -> Self {
        Self {
            hs_name: hs_name.map(str::to_owned),
            id_attr: id_attr.to_owned(),
            level,
            holders: BTreeMap::new(),
            skipped: 0,
            unusable_values: 0,
            first_unusable: None,
        }
    }

    pub fn add(&mut self, entry: DirectoryEntry) {
        let Some(id) = entry.ids.iter().find(|v| !v.trim().is_empty()) else {
            log::log!(
                self.level,
                "LDAP entry {} has no {} value: skipped",
                entry.dn,
                self.id_attr
            );
            self.skipped += 1;
            return;
        };
        let mxid = match mxid_for(id, self.hs_name.as_deref()) {
            Ok(mxid) => mxid,
            Err(candidate) => {
                log::log!(
                    self.level,
                    "LDAP entry {}: its {} makes '{candidate}', not a valid Matrix user ID: \
                     skipped",
                    entry.dn,
                    self.id_attr
                );
                self.skipped += 1;
                return;
            }
        };
        let emails = entry
            .emails
            .iter()
            .map(|v| (Medium::Email, email_address(v)));
        let phones = entry
            .phones
            .iter()
            .map(|v| (Medium::Msisdn, msisdn_address(v)));
        for (medium, address) in emails.chain(phones) {
            match address {
                Some(address) => {
                    self.holders
                        .entry((medium, address))
                        .or_default()
                        .insert((mxid.clone(), entry.dn.clone()));
                }
                None => {
                    self.unusable_values += 1;
                    self.first_unusable.get_or_insert_with(|| entry.dn.clone());
                }
            }
        }
    }

    pub fn finish(self) -> DirectorySnapshot {
        if let Some(dn) = &self.first_unusable {
            log::log!(
                self.level,
                "{} LDAP email or msisdn value(s) are no usable address (an invalid email, a \
                 phone number not in international form), first in {dn}: left out",
                self.unusable_values
            );
        }
        let mut snapshot = DirectorySnapshot {
            skipped: self.skipped,
            unusable_values: self.unusable_values,
            ..DirectorySnapshot::default()
        };
        for ((medium, address), holders) in self.holders {
            let mut mxids = holders.iter().map(|(mxid, _)| mxid);
            let first = mxids
                .next()
                .expect("an address is only recorded with a holder");
            if mxids.all(|mxid| mxid == first) {
                let mxid = first.clone();
                snapshot
                    .bindings
                    .push(DirectoryBinding::new(medium, address, mxid));
            } else {
                let dns: BTreeSet<String> = holders.into_iter().map(|(_, dn)| dn).collect();
                snapshot
                    .ambiguous
                    .push((medium, address, dns.into_iter().collect()));
            }
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_values_become_matrix_msisdns() {
        for (raw, msisdn) in [
            ("+1 555-123-4567", "15551234567"),
            ("+15551234567", "15551234567"),
            ("15551234567", "15551234567"),
            ("+1 (555) 123.4567", "15551234567"),
            ("+44\u{a0}7700\u{2011}900\u{2212}750", "447700900750"),
            (" +49 30 1234567 ", "49301234567"),
        ] {
            assert_eq!(msisdn_address(raw).as_deref(), Some(msisdn), "{raw:?}");
        }
        for raw in [
            "",
            "+",
            "030 1234567",
            "++15551234567",
            "+1 555 123 4567 ext. 12",
            "+1234567890123456",
        ] {
            assert_eq!(msisdn_address(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn email_values_are_casefolded_as_the_node_stores_them() {
        assert_eq!(
            email_address(" Alice@Example.ORG ").as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(
            email_address("Straße@example.org").as_deref(),
            Some("strasse@example.org")
        );
        assert_eq!(email_address("not an address"), None);
    }

    #[test]
    fn matrix_ids_are_built_lowercased_and_checked() {
        assert_eq!(
            mxid_for("JDoe", Some("Example.org")).unwrap(),
            "@jdoe:example.org"
        );
        assert_eq!(
            mxid_for("@JDoe:example.org", None).unwrap(),
            "@jdoe:example.org"
        );
        assert_eq!(
            mxid_for("@jdoe:example.org", Some("")).unwrap(),
            "@jdoe:example.org"
        );
        assert_eq!(
            mxid_for("bob:evil", Some("example.org")),
            Err("@bob:evil:example.org".to_owned())
        );
        assert!(mxid_for("two words", Some("example.org")).is_err());
        assert!(mxid_for("jdoe", None).is_err());
        assert!(mxid_for("", Some("example.org")).is_err());
    }

    fn entry(dn: &str, id: &str, emails: &[&str], phones: &[&str]) -> DirectoryEntry {
        DirectoryEntry {
            dn: dn.into(),
            ids: if id.is_empty() {
                vec![]
            } else {
                vec![id.into()]
            },
            emails: emails.iter().map(|s| s.to_string()).collect(),
            phones: phones.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn an_address_two_people_hold_is_ambiguous_and_left_out() {
        let mut builder = BindingsBuilder::new(Some("example.org"), "uid", log::Level::Debug);
        builder.add(entry(
            "uid=alice,o=x",
            "alice",
            &["Alice@example.org", "shared@example.org"],
            &["+1 555-123-4567"],
        ));
        builder.add(entry(
            "uid=bob,o=x",
            "bob",
            &["SHARED@example.org"],
            &["+1 555 123 0000"],
        ));
        // Carol is listed twice (two OUs): the same Matrix ID, so not ambiguous.
        builder.add(entry(
            "uid=carol,ou=a,o=x",
            "carol",
            &["carol@example.org"],
            &[],
        ));
        builder.add(entry(
            "uid=carol,ou=b,o=x",
            "Carol",
            &["carol@example.org"],
            &[],
        ));
        builder.add(entry("uid=bad,o=x", "bad:id", &["bad@example.org"], &[]));
        builder.add(entry("cn=noid,o=x", "", &["noid@example.org"], &[]));
        builder.add(entry("uid=dave,o=x", "dave", &["nope"], &["0171 1234567"]));
        let snapshot = builder.finish();
        let binding = DirectoryBinding::new;
        assert_eq!(
            snapshot.bindings,
            vec![
                binding(Medium::Email, "alice@example.org", "@alice:example.org"),
                binding(Medium::Email, "carol@example.org", "@carol:example.org"),
                binding(Medium::Msisdn, "15551230000", "@bob:example.org"),
                binding(Medium::Msisdn, "15551234567", "@alice:example.org"),
            ]
        );
        assert_eq!(
            snapshot.ambiguous,
            vec![(
                Medium::Email,
                "shared@example.org".to_owned(),
                vec!["uid=alice,o=x".to_owned(), "uid=bob,o=x".to_owned()]
            )]
        );
        assert_eq!(snapshot.skipped, 2);
        assert_eq!(snapshot.unusable_values, 2);
    }
}
