//! Framing: a frame is a 4-byte big-endian length and that many bytes of a wire-encoded message.

use bytes::{BufMut, Bytes, BytesMut};
use mirrormesh_proto::transfer::FRAME_BYTES_MAX;
use tokio::io::AsyncReadExt;

use super::stall::{Stalled, Watchdog};

/// Bytes of the length prefix.
pub(crate) const PREFIX_BYTES: usize = 4;

/// A frame holding `payload`.
pub(crate) fn encode(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(PREFIX_BYTES + payload.len());
    // Payloads are encoded messages of at most FRAME_BYTES_MAX bytes; the cast cannot truncate.
    frame.put_u32(payload.len() as u32);
    frame.put_slice(payload);
    frame.freeze()
}

/// Checks a length prefix before anything is allocated for the frame.
pub(crate) fn check_len(prefix: [u8; PREFIX_BYTES]) -> Result<usize, LenError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        Err(LenError::Empty)
    } else if len > FRAME_BYTES_MAX {
        Err(LenError::Oversized(len))
    } else {
        Ok(len)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LenError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {0} bytes exceeds the limit of {FRAME_BYTES_MAX}")]
    Oversized(usize),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("stream ended early")]
    FinishedEarly,
    #[error(transparent)]
    Stalled(#[from] Stalled),
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    #[error(transparent)]
    Io(std::io::Error),
}

/// Appends exactly `n` bytes from `recv` to `buf`, failing if `watchdog` sees no byte arrive for its period. One copy,
/// out of quinn's receive buffers; `buf` is not zero-filled first.
pub(crate) async fn read_exact_into(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    n: usize,
    watchdog: &mut Watchdog,
) -> Result<(), ReadError> {
    let target = buf.len() + n;
    buf.reserve(n);
    while buf.len() < target {
        let want = target - buf.len();
        let mut limited = (&mut *buf).limit(want);
        match watchdog.run(recv.read_buf(&mut limited)).await? {
            Ok(0) => return Err(ReadError::FinishedEarly),
            Ok(_) => {}
            Err(e) => return Err(read_error(e)),
        }
    }
    Ok(())
}

/// Waits for the end of the stream; Ok(false) if more bytes came instead.
pub(crate) async fn read_end(recv: &mut quinn::RecvStream, watchdog: &mut Watchdog) -> Result<bool, ReadError> {
    match watchdog.run(recv.read_chunk(1, true)).await? {
        Ok(None) => Ok(true),
        Ok(Some(_)) => Ok(false),
        Err(e) => Err(ReadError::Read(e)),
    }
}

/// quinn's AsyncRead wraps its `ReadError` in an `io::Error`; take it back out.
fn read_error(e: std::io::Error) -> ReadError {
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<quinn::ReadError>()) {
        Some(Ok(read)) => ReadError::Read(*read),
        Some(Err(other)) => ReadError::Io(std::io::Error::new(kind, other)),
        None => ReadError::Io(kind.into()),
    }
}
