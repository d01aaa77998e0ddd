//! `[sms] bodyTemplate`: the text of a validation SMS, read as Python's `str.format` reads it
//! with one field, `{token}`; checked when the config loads.

/// `bodyTemplate` read once: text and `{token}` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTemplate {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Token,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("'{{{0}}}' is not a field here: only {{token}} is (write {{{{ and }}}} for braces)")]
    UnknownField(String),
    #[error("a '{{' is never closed (write {{{{ for a brace)")]
    Unclosed,
    #[error("a single '}}' (write }}}} for a brace)")]
    SingleClose,
}

impl BodyTemplate {
    /// Reads a template as Python's `str.format(token=...)` would: `{token}` is the code,
    /// `{{` and `}}` are literal braces; anything else in braces is an error (Sydent would
    /// fail on it at the first text, this node at start).
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.next_if_eq(&'{').is_some() => text.push('{'),
                '}' if chars.next_if_eq(&'}').is_some() => text.push('}'),
                '}' => return Err(TemplateError::SingleClose),
                '{' => {
                    let mut field = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => field.push(c),
                            None => return Err(TemplateError::Unclosed),
                        }
                    }
                    if field != "token" {
                        return Err(TemplateError::UnknownField(field));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Token);
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self { pieces })
    }

    /// The text with `token` in every `{token}`.
    pub fn render(&self, token: &str) -> String {
        self.pieces
            .iter()
            .map(|piece| match piece {
                Piece::Text(text) => text.as_str(),
                Piece::Token => token,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_read_as_python_format_with_one_field() {
        for (template, rendered) in [
            ("Your code is {token}", "Your code is 123456"),
            ("{token}", "123456"),
            ("{token} is {token}", "123456 is 123456"),
            ("{{token}} = {token}", "{token} = 123456"),
            ("{{{token}}}", "{123456}"),
            ("no code", "no code"),
            ("", ""),
            ("Ünïcode {token} ✓", "Ünïcode 123456 ✓"),
        ] {
            let parsed = BodyTemplate::parse(template).unwrap();
            assert_eq!(parsed.render("123456"), rendered, "{template}");
        }
        for (template, error) in [
            ("{code}", TemplateError::UnknownField("code".into())),
            ("{}", TemplateError::UnknownField(String::new())),
            ("{0}", TemplateError::UnknownField("0".into())),
            ("{ token}", TemplateError::UnknownField(" token".into())),
            ("{token", TemplateError::Unclosed),
            ("code}", TemplateError::SingleClose),
            ("{token}}", TemplateError::SingleClose),
        ] {
            assert_eq!(BodyTemplate::parse(template), Err(error), "{template}");
        }
    }
}
