//! The one binary encoding for everything idemkv stores or sends between
//! peers: bincode (standard config) over serde. Must not be used for the
//! public API, which is protobuf.
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io;

/// bincode's encode or decode error, as the I/O error every caller returns.
fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(invalid)
}

/// Append `value`'s encoding to `out`: encoding a struct field by field
/// this way gives the same bytes as [`encode`] of the whole.
pub fn encode_into<T: Serialize>(out: &mut Vec<u8>, value: &T) -> io::Result<()> {
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .map(|_| ())
        .map_err(invalid)
}

/// The length of `value`'s encoding, counted without building it.
pub fn encoded_len<T: Serialize>(value: &T) -> io::Result<usize> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, bincode::config::standard())
        .map_err(invalid)?;
    Ok(size.bytes_written)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    let (value, _) =
        bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(invalid)?;
    Ok(value)
}

/// Decode a value that borrows its strings and bytes from `bytes`.
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> io::Result<T> {
    let (value, _) = bincode::serde::borrow_decode_from_slice(bytes, bincode::config::standard())
        .map_err(invalid)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Sample {
        owner: String,
        token: u64,
        result: Option<Vec<u8>>,
        tags: Vec<(String, u32)>,
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        for (owner, token, result) in [
            ("", 0, None),
            ("worker-7", 300, Some(vec![1u8; 3])),
            ("w", u64::MAX, Some(vec![0u8; 70_000])),
        ] {
            let v = Sample {
                owner: owner.into(),
                token,
                result,
                tags: vec![("a".into(), 1), ("bb".into(), 70_000)],
            };
            assert_eq!(encoded_len(&v).unwrap(), encode(&v).unwrap().len());
        }
    }
}
