//! rki-tests
