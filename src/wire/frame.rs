//! Length-prefixed frames on a byte stream: a 4-byte big-endian body length, then the body
//! ([`Message::encode`]).
//!
//! [`FrameDecoder`] takes bytes as they arrive, in any split, and yields whole messages. It
//! refuses a frame whose announced length exceeds [`FRAME_BYTES_MAX`] as soon as the four length
//! bytes are in, so no frame can make it wait for (and buffer) more than the cap. It buffers what it
//! is given: the caller bounds that by reading from the transport only as fast as it takes
//! messages out. After an error the stream is out of step for good: the decoder keeps
//! returning that error and the connection must be closed.

use super::{Message, WireError, FRAME_BYTES_MAX};

/// Bytes of the length prefix.
pub const PREFIX_BYTES: usize = 4;

/// Encodes a message as one frame: length prefix and body.
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let body = msg.encode()?;
    let mut out = Vec::with_capacity(PREFIX_BYTES + body.len());
    // `Message::encode` refuses bodies over the cap, which is far below u32::MAX.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Splits a byte stream into messages.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Received bytes; `buf[start..]` is not yet returned as messages and starts at a frame
    /// boundary.
    buf: Vec<u8>,
    start: usize,
    /// The first error met: the stream cannot be resynchronised after it.
    failed: Option<WireError>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes received bytes. Refuses them (and everything after) if they complete the length
    /// prefix of an oversized frame.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        // Drop what was consumed once per push, not once per frame: many small frames in one
        // push cost linear time.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        self.check_length().map(|_| ())
    }

    /// The next whole message, if one has arrived. Each frame is decoded and validated
    /// ([`Message::decode`]); an error ends the stream.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>, WireError> {
        let Some(len) = self.check_length()? else {
            return Ok(None);
        };
        let end = self.start + PREFIX_BYTES + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let decoded = Message::decode(&self.buf[self.start + PREFIX_BYTES..end]);
        self.start = end;
        match decoded {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The length of the frame at the front, once its prefix is in; an error if it is too long.
    fn check_length(&mut self) -> Result<Option<usize>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let Some(prefix) = self.buf[self.start..].first_chunk::<PREFIX_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > FRAME_BYTES_MAX {
            self.buf = Vec::new();
            self.start = 0;
            return Err(self.fail(WireError::FrameTooLarge { len: len as u64 }));
        }
        Ok(Some(len))
    }

    fn fail(&mut self, e: WireError) -> WireError {
        self.failed = Some(e.clone());
        e
    }
}
