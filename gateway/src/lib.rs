//! rki-gateway
