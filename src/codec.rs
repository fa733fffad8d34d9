//! The one binary encoding for everything idemkv stores or sends between
//! peers: bincode (standard config) over serde. Must not be used for the
//! public API, which is protobuf.
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io;

pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Append `value`'s encoding to `out`: encoding a struct field by field
/// this way gives the same bytes as [`encode`] of the whole.
pub fn encode_into<T: Serialize>(out: &mut Vec<u8>, value: &T) -> io::Result<()> {
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    let (value, _) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(value)
}

/// Decode a value that borrows its strings and bytes from `bytes`.
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> io::Result<T> {
    let (value, _) = bincode::serde::borrow_decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(value)
}
