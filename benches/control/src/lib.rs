//! Shared pieces of the load benchmark's control servers and `benchtool`.

/// Code generated from `proto/control.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("control.v1");
}

use std::{net::SocketAddr, path::Path};

use bytes::Bytes;

/// Wraps protobuf bytes in a gRPC length-prefixed message: flag 0 (not
/// compressed), 4-byte big-endian length, the bytes.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// Splits a file of concatenated gRPC messages back into one frame each.
pub fn split_frames(data: &[u8]) -> Result<Vec<Bytes>, String> {
    let data = Bytes::copy_from_slice(data);
    let mut frames = Vec::new();
    let mut at = 0;
    while at < data.len() {
        if data.len() - at < 5 {
            return Err(format!("truncated frame header at byte {at}"));
        }
        if data[at] != 0 {
            return Err(format!("frame at byte {at} has compression flag {}", data[at]));
        }
        let len = u32::from_be_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]) as usize;
        let end = at + 5 + len;
        if end > data.len() {
            return Err(format!("frame at byte {at} runs past the end of the file"));
        }
        frames.push(data.slice(at..end));
        at = end;
    }
    Ok(frames)
}

/// Reads a frames file (see [`split_frames`]).
pub fn read_frames(path: &Path) -> Result<Vec<Bytes>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let frames = split_frames(&data).map_err(|e| format!("{}: {e}", path.display()))?;
    if frames.is_empty() {
        return Err(format!("{} holds no request", path.display()));
    }
    Ok(frames)
}

/// The listen address from the first argument or `CONTROL_LISTEN_ADDR`.
pub fn listen_addr(default: &str) -> Result<SocketAddr, String> {
    let raw = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("CONTROL_LISTEN_ADDR").ok())
        .unwrap_or_else(|| default.to_owned());
    raw.parse().map_err(|e| format!("listen address {raw:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut file = grpc_frame(b"abc");
        file.extend(grpc_frame(b""));
        file.extend(grpc_frame(&[7; 300]));
        let frames = split_frames(&file).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(frames[2].len(), 305);
        assert!(split_frames(&file[..file.len() - 1]).is_err());
    }
}
