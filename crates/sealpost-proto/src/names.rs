//! Validation of user-chosen names: usernames and group names.

use thiserror::Error;

use crate::limits::{GROUP_NAME_MAX_CHARS, USERNAME_MAX_LEN, USERNAME_MIN_LEN};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "a username is {USERNAME_MIN_LEN} to {USERNAME_MAX_LEN} characters of a-z, 0-9, '_' and '.'"
    )]
    InvalidUsername,
    #[error("a group name is 1 to {GROUP_NAME_MAX_CHARS} characters with no control characters")]
    InvalidGroupName,
}

/// Checks a username against `[a-z0-9_.]{3,32}` (design §3).
pub fn validate_username(name: &str) -> Result<(), NameError> {
    let ok = (USERNAME_MIN_LEN..=USERNAME_MAX_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NameError::InvalidUsername)
    }
}

/// Checks a group's display name: non-empty, bounded, no control characters.
pub fn validate_group_name(name: &str) -> Result<(), NameError> {
    let chars = name.chars().count();
    let ok = chars > 0
        && chars <= GROUP_NAME_MAX_CHARS
        && !name.chars().any(char::is_control)
        && !name.trim().is_empty();
    if ok {
        Ok(())
    } else {
        Err(NameError::InvalidGroupName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for good in ["bob", "alice_1", "a.b.c", "x".repeat(32).as_str()] {
            assert_eq!(validate_username(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "ab",
            "Alice",
            "al ice",
            "bob!",
            "x".repeat(33).as_str(),
            "ünï",
        ] {
            assert_eq!(
                validate_username(bad),
                Err(NameError::InvalidUsername),
                "{bad}"
            );
        }
    }

    #[test]
    fn group_names() {
        assert!(validate_group_name("Book club 📚").is_ok());
        assert!(validate_group_name("").is_err());
        assert!(validate_group_name("   ").is_err());
        assert!(validate_group_name("a\nb").is_err());
        assert!(validate_group_name(&"x".repeat(GROUP_NAME_MAX_CHARS + 1)).is_err());
    }
}
