pub mod av1;
pub mod frame;
pub mod h264;
pub mod time;
pub mod vp8;
pub mod vp9;

/// Inputs for the bitstream parsers' tests.
#[cfg(test)]
mod test_input {
    /// Bytes from a string of `0` and `1`, most significant bit first, the
    /// last byte padded with zeros.
    pub fn from_bits(bits: &str) -> Vec<u8> {
        bits.as_bytes()
            .chunks(8)
            .map(|c| {
                let byte = std::str::from_utf8(c).unwrap();
                u8::from_str_radix(&format!("{byte:0<8}"), 2).unwrap()
            })
            .collect()
    }

    /// `count` pseudo-random inputs of `len` bytes (xorshift from `seed`).
    pub fn noise(seed: u32, count: usize, len: usize) -> Vec<Vec<u8>> {
        let mut x = seed | 1;
        let mut byte = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        (0..count)
            .map(|_| (0..len).map(|_| byte()).collect())
            .collect()
    }
}
