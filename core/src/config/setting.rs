//! How one setting's value is read from its text form (an environment variable, a
//! `--set key=value` flag) and written back as text (the environment handed to agents).
//! The TOML file goes through serde instead; both paths end in the same typed field.

use std::path::PathBuf;

use crate::error::{CoreError, ValidationError};
use crate::secret::Secret;

/// A type a setting can have.
pub trait Setting: Sized {
    /// Parses the text form; `key` names the setting in the error.
    fn parse_text(key: &str, text: &str) -> Result<Self, CoreError>;
    /// The text form `parse_text` reads back; `None` for an unset optional value.
    fn to_text(&self) -> Option<String>;
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> CoreError {
    CoreError::Invalid(ValidationError::new(key, reason))
}

impl Setting for String {
    fn parse_text(_: &str, text: &str) -> Result<Self, CoreError> {
        Ok(text.to_string())
    }
    fn to_text(&self) -> Option<String> {
        Some(self.clone())
    }
}

impl Setting for PathBuf {
    fn parse_text(_: &str, text: &str) -> Result<Self, CoreError> {
        Ok(PathBuf::from(text))
    }
    fn to_text(&self) -> Option<String> {
        Some(self.display().to_string())
    }
}

impl Setting for Secret {
    fn parse_text(_: &str, text: &str) -> Result<Self, CoreError> {
        Ok(Secret::new(text))
    }
    /// The plain value: the text form exists to hand settings to a child's environment.
    fn to_text(&self) -> Option<String> {
        Some(self.expose().to_string())
    }
}

/// An empty text clears an optional setting, so an environment variable can unset a
/// value the file gave.
impl<T: Setting> Setting for Option<T> {
    fn parse_text(key: &str, text: &str) -> Result<Self, CoreError> {
        if text.is_empty() {
            Ok(None)
        } else {
            T::parse_text(key, text).map(Some)
        }
    }
    fn to_text(&self) -> Option<String> {
        self.as_ref().and_then(Setting::to_text)
    }
}

impl Setting for bool {
    fn parse_text(key: &str, text: &str) -> Result<Self, CoreError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(invalid(key, format!("`{text}` is not true or false"))),
        }
    }
    fn to_text(&self) -> Option<String> {
        Some(self.to_string())
    }
}

macro_rules! numeric_settings {
    ($($ty:ty),*) => {$(
        impl Setting for $ty {
            fn parse_text(key: &str, text: &str) -> Result<Self, CoreError> {
                text.trim()
                    .parse()
                    .map_err(|_| invalid(key, format!("`{text}` is not a number")))
            }
            fn to_text(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
numeric_settings!(u16, u32, u64, f64);

/// A setting that is one of a few words: an enum whose serde form, text form and error
/// message all come from one list.
macro_rules! choice_setting {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $vdoc:literal])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[doc = $vdoc])* #[serde(rename = $word)] $variant),+
        }

        impl $name {
            /// Every accepted word, in order.
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $word),+ }
            }

            /// The value for its word, if it is one.
            pub fn from_word(word: &str) -> Option<Self> {
                match word.trim() { $($word => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::config::Setting for $name {
            fn parse_text(key: &str, text: &str) -> Result<Self, $crate::CoreError> {
                Self::from_word(text).ok_or_else(|| {
                    $crate::config::setting::invalid(key, format!(
                        "must be {}, not `{text}`",
                        $crate::config::setting::one_of(Self::WORDS)
                    ))
                })
            }
            fn to_text(&self) -> Option<String> {
                Some(self.as_str().to_string())
            }
        }
    };
}
pub(crate) use choice_setting;

/// "`a`, `b` or `c`", for error messages.
pub(crate) fn one_of(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip_and_bad_ones_name_the_key() {
        assert_eq!(u64::parse_text("k", " 42 ").unwrap(), 42);
        let e = u16::parse_text("temporal_port", "70000").unwrap_err();
        assert!(e.to_string().contains("temporal_port"), "{e}");
        assert_eq!(Option::<String>::parse_text("k", "").unwrap(), None);
        assert_eq!(Some(PathBuf::from("/x")).to_text().as_deref(), Some("/x"));
        assert!(bool::parse_text("kafka_dlq", "maybe").is_err());
        assert_eq!(one_of(&["a", "b", "c"]), "`a`, `b` or `c`");
        assert_eq!(one_of(&["a"]), "`a`");
    }
}
