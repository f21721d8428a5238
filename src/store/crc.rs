//! CRC-32C of log frames, short inputs fast.
//!
//! A frame's checksum covers its 4 length bytes and its payload (`Log`'s module doc); a local
//! entry's checksum is then extended over its 9-byte sequence trailer under the log's lock.
//! Typical frames are 150-200 bytes. The `crc32c` crate is built for long buffers: every call
//! aligns, splits into three interleaved streams and recombines, about 130 instructions of
//! set-up even for the 9-byte trailer. Here short inputs go straight through the SSE 4.2 CRC
//! instruction, 8 bytes at a time, when the CPU has it (a run-time check the standard library
//! caches); long inputs,
//! and CPUs without it, use the crate. Both give the same value (a property test checks it).

/// Inputs up to this long take the straight path; longer ones the crate's interleaved one.
const SHORT_BYTES: usize = 512;

/// CRC-32C of `len ++ payload`: the checksum of a frame.
pub(crate) fn frame(len: [u8; 4], payload: &[u8]) -> u32 {
    extend(extend(0, &len), payload)
}

/// Extends a CRC-32C computed over some bytes over the `more` that follow them.
pub(crate) fn extend(crc: u32, more: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if more.len() <= SHORT_BYTES && std::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE 4.2 (checked just above), the only requirement of
            // a function compiled with that feature enabled.
            return !unsafe { sse42::update(!crc, more) };
        }
    }
    crc32c::crc32c_append(crc, more)
}

#[cfg(target_arch = "x86_64")]
mod sse42 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};

    /// Runs the CRC-32C register `state` (not inverted) over `data`.
    ///
    /// # Safety
    ///
    /// The CPU must support SSE 4.2. (An `unsafe fn` rather than a safe target-feature
    /// function, which needs Rust 1.86, so the crate keeps building with its `rust-version`.)
    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn update(state: u32, data: &[u8]) -> u32 {
        let mut words = data.chunks_exact(8);
        let mut wide = u64::from(state);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            wide = _mm_crc32_u64(wide, u64::from_le_bytes(b));
        }
        // The instruction leaves the 32-bit register zero-extended.
        let mut state = wide as u32;
        for &byte in words.remainder() {
            state = _mm_crc32_u8(state, byte);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // The CRC-32C check value (RFC 3720, B.4): "123456789".
        assert_eq!(extend(0, b"123456789"), 0xE306_9283);
        assert_eq!(extend(0, &[]), 0);
        assert_eq!(
            frame(3u32.to_le_bytes(), b"abc"),
            crc32c::crc32c(&[3, 0, 0, 0, b'a', b'b', b'c'])
        );
    }

    proptest! {
        #[test]
        fn agrees_with_the_crate(
            len in any::<[u8; 4]>(),
            payload in prop::collection::vec(any::<u8>(), 0..1200),
            tail in prop::collection::vec(any::<u8>(), 0..20),
            seed in any::<u32>(),
        ) {
            let mut whole = len.to_vec();
            whole.extend_from_slice(&payload);
            prop_assert_eq!(frame(len, &payload), crc32c::crc32c(&whole));
            prop_assert_eq!(extend(seed, &tail), crc32c::crc32c_append(seed, &tail));
            prop_assert_eq!(
                extend(frame(len, &payload), &tail),
                crc32c::crc32c_append(crc32c::crc32c(&whole), &tail)
            );
        }
    }
}
