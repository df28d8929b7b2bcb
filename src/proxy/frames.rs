//! Where a worker's stream of websocket frames stands, counted on the bytes written
//! on to the client, so that corral can put a close frame of its own between two of
//! them. It reads only frame headers (RFC 6455 5.2) and keeps no bytes; it does not
//! check the frames (the client does).

use crate::runtime::handover;

/// Where a stream of websocket frames stands, counted on the bytes written on, so
/// that a frame of corral's own can be put between two of them. Control frames may
/// come between the fragments of a message (RFC 6455 5.4), so "between frames" is
/// enough.
#[derive(Default, Clone, Copy)]
pub(crate) struct Frames {
    head: [u8; 14],
    /// Header bytes of the frame in progress seen so far (0: between frames or in
    /// a payload).
    pub(crate) have: usize,
    /// Header length once its second byte is known.
    need: usize,
    /// Payload bytes still to come.
    pub(crate) left: u64,
}

impl Frames {
    /// Where an upgrade's relay stood in the frame stream.
    pub(crate) fn resumed(at: &handover::Frame) -> Frames {
        let mut head = [0u8; 14];
        let n = at.head.len().min(head.len());
        head[..n].copy_from_slice(&at.head[..n]);
        Frames {
            head,
            have: at.have.min(head.len()),
            need: at.need.min(head.len()),
            left: at.left,
        }
    }

    /// Its position, for an upgrade to carry.
    pub(crate) fn carried(&self) -> handover::Frame {
        handover::Frame {
            head: self.head[..self.have].to_vec(),
            have: self.have,
            need: self.need,
            left: self.left,
        }
    }

    pub(crate) fn between(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// How many bytes of `data`, written on, end the frame in flight: 0 when between
    /// frames already, None when the frame goes on past `data`.
    pub(crate) fn until_between(&self, data: &[u8]) -> Option<usize> {
        if self.between() {
            return Some(0);
        }
        let mut f = *self;
        let mut used = 0;
        // A head read in part: its few bytes one at a time.
        while f.left == 0 && !f.between() {
            let byte = data.get(used..used + 1)?;
            f.feed(byte);
            used += 1;
        }
        if f.between() {
            return Some(used);
        }
        let rest = (data.len() - used) as u64;
        (rest >= f.left).then(|| used + f.left as usize)
    }

    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len() as u64);
                self.left -= n;
                data = &data[n as usize..];
                continue;
            }
            if self.have == 0 {
                // The usual case: the whole header in this read.
                if let Some(need) = data.get(1).map(|b| header_len(*b)) {
                    if let Some(head) = data.get(..need) {
                        self.left = payload_len(head);
                        data = &data[need..];
                        continue;
                    }
                }
            }
            // A header cut between two reads: kept a byte at a time.
            self.head[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have == 2 {
                self.need = header_len(self.head[1]);
            }
            if self.have >= 2 && self.have == self.need {
                self.left = payload_len(&self.head[..self.need]);
                self.have = 0;
            }
        }
    }
}

/// A websocket frame header's length, from its second byte (RFC 6455 5.2).
fn header_len(second: u8) -> usize {
    let ext = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// The payload length a whole frame header gives.
fn payload_len(head: &[u8]) -> u64 {
    match head[1] & 0x7f {
        126 => u16::from_be_bytes([head[2], head[3]]) as u64,
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&head[2..10]);
            u64::from_be_bytes(n)
        }
        n => n as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with a payload of `len` bytes, masked or not.
    fn frame(len: usize, masked: bool) -> Vec<u8> {
        let mask = if masked { 0x80 } else { 0 };
        let mut f = vec![0x82];
        match len {
            0..=125 => f.push(mask | len as u8),
            126..=65535 => {
                f.push(mask | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x5a, len));
        f
    }

    #[test]
    fn frame_ends_are_found_however_the_reads_cut_them() {
        let sizes = [
            (0, false),
            (5, true),
            (125, false),
            (126, false),
            (300, true),
            (70_000, false),
        ];
        let frames: Vec<Vec<u8>> = sizes.iter().map(|(n, m)| frame(*n, *m)).collect();
        let stream: Vec<u8> = frames.concat();
        let ends: std::collections::BTreeSet<usize> = frames
            .iter()
            .scan(0, |at, f| {
                *at += f.len();
                Some(*at)
            })
            .collect();
        for cut in [1, 2, 3, 7, 13, 127, 4096, stream.len()] {
            let mut f = Frames::default();
            let mut at = 0;
            for piece in stream.chunks(cut) {
                f.feed(piece);
                at += piece.len();
                assert_eq!(f.between(), ends.contains(&at), "reads of {cut}, at {at}");
            }
        }
    }

    /// From any place in the stream, `until_between` names the next frame end
    /// within what follows (0 at an end), or None when it lies beyond.
    #[test]
    fn the_end_of_the_frame_in_flight_is_found_from_anywhere() {
        let sizes = [
            (0, false),
            (5, true),
            (126, false),
            (300, true),
            (70_000, false),
        ];
        let frames: Vec<Vec<u8>> = sizes.iter().map(|(n, m)| frame(*n, *m)).collect();
        let stream: Vec<u8> = frames.concat();
        let mut ends = vec![0];
        for f in &frames {
            ends.push(ends.last().copied().unwrap_or(0) + f.len());
        }
        for at in (0..stream.len()).step_by(37).chain([1, 2, 3, 9, 10]) {
            let mut f = Frames::default();
            f.feed(&stream[..at]);
            let next = ends
                .iter()
                .copied()
                .find(|e| *e >= at)
                .unwrap_or(stream.len());
            for window in [1, 4, 200, stream.len()] {
                let rest = &stream[at..(at + window).min(stream.len())];
                let expected = (next - at <= rest.len()).then_some(next - at);
                assert_eq!(f.until_between(rest), expected, "at {at}, {window} ahead");
            }
        }
    }
}
