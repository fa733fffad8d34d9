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

/// The most bytes the strings and byte buffers of one decoded value may
/// claim together: the largest peer message (`wire::MAX_PEER_MESSAGE`,
/// held equal where both are in reach, `raft/network.rs`), which bounds
/// everything idemkv decodes (a log entry must fit one to be replicated;
/// records and marks are far smaller).
///
/// bincode allocates a string from its length prefix before it reads the
/// bytes, so without a limit eleven bytes from a peer ("a namespace of
/// 2^62 bytes follows") made the allocator abort the whole node. With it, a
/// length past the limit is refused as undecodable before any allocation.
pub const DECODE_LIMIT: usize = 256 * 1024 * 1024;

fn decoding() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    let (value, _) = bincode::serde::decode_from_slice(bytes, decoding()).map_err(invalid)?;
    Ok(value)
}

/// Decode a value that borrows its strings and bytes from `bytes`.
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> io::Result<T> {
    let (value, _) =
        bincode::serde::borrow_decode_from_slice(bytes, decoding()).map_err(invalid)?;
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

    /// A length prefix past the limit is an error, not an allocation: a
    /// string said to be 2^62 bytes long aborted the process before.
    #[test]
    fn a_length_past_the_limit_is_refused_before_allocating() {
        // 0xFD: a u64 length follows (bincode's varint), here 2^62.
        let huge = [0xFD, 0, 0, 0, 0, 0, 0, 0, 0x40];
        let e = decode::<String>(&huge).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(decode::<Vec<String>>(&[&[1u8][..], &huge].concat()).is_err());
        // Just past the limit too; a string within it that is really there
        // still decodes.
        let past = encode(&(DECODE_LIMIT as u64 + 1)).unwrap();
        assert!(decode::<String>(&past).is_err());
        let fine = encode(&"x".repeat(70_000)).unwrap();
        assert_eq!(decode::<String>(&fine).unwrap().len(), 70_000);
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
