//! Phone numbers as msisdn requestToken receives them: `phone_number` read in the region
//! `country` (an ISO 3166 code such as `GB`, the default when the number has no `+`), with
//! libphonenumber's rules (the `phonenumber` crate), into the msisdn this node stores
//! (E.164 without the `+`) and the INTERNATIONAL format the answer shows; and the
//! `smsrule.<country code>` check that decides whether a text may go there.
//!
//! As in Sydent, a number only has to parse and so yield a country code: it is **not** required
//! to be valid by the metadata (`is_valid`). The UK's drama range `+44 7700 900xxx` is not a
//! valid number there, yet Sydent's own tests text it, and a stricter check here would refuse
//! numbers that Sydent accepts whenever the crate's metadata lags the real numbering plans.
//! The SMS gateway is the judge of deliverability. The region is read as Sydent's
//! libphonenumber reads it: exactly (`gb` is no region), and an unknown region is only an
//! error for a number without `+`.

use crate::config::{SmsConfig, SmsRule};

/// libphonenumber refuses inputs longer than this before parsing them.
const MAX_INPUT_LEN: usize = 250;

/// A phone number normalised for storage and display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneNumber {
    /// E.164 without the `+`: `447700900750`. The address of the `msisdn` medium.
    pub msisdn: String,
    /// INTERNATIONAL format: `+44 7700 900750`.
    pub intl_fmt: String,
    /// The country calling code: `44`.
    pub country_code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// The number does not parse (400 `M_INVALID_ADDRESS`; Sydent says
    /// `M_INVALID_PHONE_NUMBER`).
    #[error("invalid phone number: {0}")]
    Invalid(String),
    /// `smsrule.<country code> = reject` (400 `M_DESTINATION_REJECTED`).
    #[error("phone numbers with country code {0} are not accepted")]
    DestinationRejected(u16),
}

impl PhoneNumber {
    /// Reads `phone_number` in the region `country` (`GB`, `US`, ...; may be empty when the
    /// number starts with `+` or `00`).
    pub fn parse(phone_number: &str, country: &str) -> Result<Self, PhoneError> {
        if phone_number.len() > MAX_INPUT_LEN {
            return Err(PhoneError::Invalid("the number is too long".into()));
        }
        let region = country.parse::<phonenumber::country::Id>().ok();
        let parsed = phonenumber::parse(region, phone_number)
            .map_err(|e| PhoneError::Invalid(e.to_string()))?;
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        let msisdn = e164.strip_prefix('+').unwrap_or(&e164).to_string();
        Ok(Self {
            msisdn,
            intl_fmt: parsed
                .format()
                .mode(phonenumber::Mode::International)
                .to_string(),
            country_code: parsed.code().value(),
        })
    }
}

/// Whether texts may go to numbers with this country calling code: refused only when
/// `smsrule.<country_code> = reject`.
pub fn check_destination(sms: &SmsConfig, country_code: u16) -> Result<(), PhoneError> {
    match sms.rules.get(&country_code.to_string()) {
        Some(SmsRule::Reject) => Err(PhoneError::DestinationRejected(country_code)),
        Some(SmsRule::Allow) | None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(number: &str, country: &str) -> PhoneNumber {
        PhoneNumber::parse(number, country).unwrap_or_else(|e| panic!("{number} {country}: {e}"))
    }

    /// Each case was run through Python's `phonenumbers` (9.0.x, the library Sydent uses):
    /// `parse(number, country)`, then E.164 and INTERNATIONAL.
    #[test]
    fn numbers_normalise_as_in_sydent() {
        for (number, country, msisdn, intl_fmt, code) in [
            // Sydent's test number, as its tests send it, and in national form.
            ("447700900750", "GB", "447700900750", "+44 7700 900750", 44),
            ("07700900750", "GB", "447700900750", "+44 7700 900750", 44),
            ("+447700900750", "", "447700900750", "+44 7700 900750", 44),
            ("+1 650 253 0000", "US", "16502530000", "+1 650-253-0000", 1),
            ("6502530000", "US", "16502530000", "+1 650-253-0000", 1),
            ("16502530000", "US", "16502530000", "+1 650-253-0000", 1),
            // An unknown region does not matter when the number says its country.
            ("+16502530000", "XX", "16502530000", "+1 650-253-0000", 1),
            // The international prefix of the region.
            (
                "0033 1 23 45 67 89",
                "GB",
                "33123456789",
                "+33 1 23 45 67 89",
                33,
            ),
            (
                "00 33 1 23 45 67 89",
                "FR",
                "33123456789",
                "+33 1 23 45 67 89",
                33,
            ),
            ("+800 1234 5678", "", "80012345678", "+800 1234 5678", 800),
        ] {
            let parsed = ok(number, country);
            assert_eq!(
                parsed,
                PhoneNumber {
                    msisdn: msisdn.into(),
                    intl_fmt: intl_fmt.into(),
                    country_code: code,
                },
                "{number} in {country}"
            );
        }
    }

    #[test]
    fn numbers_without_a_country_code_are_refused() {
        for (number, country) in [
            // No `+` and no usable region (Python: "Missing or invalid default region").
            ("447700900750", ""),
            ("447700900750", "None"),
            // Regions are upper case, as libphonenumber reads them.
            ("07700900750", "gb"),
            ("12", ""),
            // No such country calling code.
            ("+99912345678", "GB"),
            ("+44 1", "GB"),
            ("", "GB"),
            ("not a number", "GB"),
        ] {
            assert!(
                matches!(
                    PhoneNumber::parse(number, country),
                    Err(PhoneError::Invalid(_))
                ),
                "{number:?} in {country:?} parsed"
            );
        }
        let long = format!("+44{}", "7".repeat(300));
        assert!(PhoneNumber::parse(&long, "GB").is_err());
    }

    #[test]
    fn the_fiction_range_is_accepted_though_not_valid() {
        // The reason this module does not ask for is_valid(): Sydent texts these.
        let parsed = phonenumber::parse(None, "+447700900750").unwrap();
        assert!(!parsed.is_valid());
        assert_eq!(ok("07700900750", "GB").msisdn, "447700900750");
    }

    #[test]
    fn sms_rules_reject_only_their_country() {
        let text = "[sms]\nsmsrule.44 = reject\nsmsrule.1 = allow\n\n[crypto]\n\
                    ed25519.signingkey = ed25519 0 nEZPmUsRlnFs0fRIXTX1vjS6HP5gS6fEmrkYTvV0oNQ\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sydent.conf");
        std::fs::write(&path, text).unwrap();
        let sms = crate::Config::load(&path, &|_| None).unwrap().config.sms;
        assert_eq!(
            check_destination(&sms, 44),
            Err(PhoneError::DestinationRejected(44))
        );
        assert_eq!(check_destination(&sms, 1), Ok(()));
        assert_eq!(check_destination(&sms, 33), Ok(()));
    }
}
