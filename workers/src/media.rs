//! What a media file says about itself — dimensions and duration — read by
//! hand from the bytes: WAV, GIF, MP4/MOV, MP3. A value the bytes do not
//! reliably give is `None`; garbage and truncated files never panic.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaInfo {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub duration_ms: Option<u64>,
}

/// Read dimensions and duration. The format is recognised by its magic
/// numbers — bytes without them are not that format, whatever the label
/// says; `content_type` only vouches for an untagged MP3 stream.
pub fn probe(bytes: &[u8], content_type: &str) -> MediaInfo {
    let format = sniff(bytes).or_else(|| {
        (Format::from_content_type(content_type) == Some(Format::Mp3)).then_some(Format::Mp3)
    });
    match format {
        Some(Format::Wav) => wav(bytes),
        Some(Format::Gif) => gif(bytes),
        Some(Format::Mp4) => mp4(bytes),
        Some(Format::Mp3) => mp3(bytes),
        _ => None,
    }
    .unwrap_or_default()
}

/// The file extension for a content type ("bin" when unknown).
pub fn extension_for(content_type: &str) -> &'static str {
    match essence(content_type).as_str() {
        "video/mp4" | "application/mp4" => "mp4",
        "audio/mp4" | "audio/m4a" | "audio/x-m4a" => "m4a",
        "video/quicktime" => "mov",
        "audio/mpeg" | "audio/mp3" | "audio/mpeg3" | "audio/x-mpeg-3" => "mp3",
        "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => "wav",
        "image/gif" => "gif",
        "video/webm" | "audio/webm" => "webm",
        "audio/ogg" | "audio/opus" | "video/ogg" => "ogg",
        "audio/flac" | "audio/x-flac" => "flac",
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "text/plain" | "text/markdown" => "txt",
        "application/json" => "json",
        _ => "bin",
    }
}

/// The content type the bytes announce by their magic numbers, if any.
pub fn sniff_content_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" && &bytes[8..12] == b"M4A " {
        return Some("audio/mp4");
    }
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" && &bytes[8..12] == b"qt  " {
        return Some("video/quicktime");
    }
    Some(match sniff(bytes)? {
        Format::Wav => "audio/wav",
        Format::Gif => "image/gif",
        Format::Mp4 => "video/mp4",
        Format::Mp3 => "audio/mpeg",
        Format::Webm => "video/webm",
        Format::Ogg => "audio/ogg",
        Format::Flac => "audio/flac",
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Wav,
    Gif,
    Mp4,
    Mp3,
    Webm,
    Ogg,
    Flac,
}

impl Format {
    fn from_content_type(content_type: &str) -> Option<Self> {
        Some(match extension_for(content_type) {
            "wav" => Format::Wav,
            "gif" => Format::Gif,
            "mp4" | "m4a" | "mov" => Format::Mp4,
            "mp3" => Format::Mp3,
            _ => return None,
        })
    }
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn sniff(b: &[u8]) -> Option<Format> {
    if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WAVE" {
        return Some(Format::Wav);
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some(Format::Gif);
    }
    if b.len() >= 8 && matches!(&b[4..8], b"ftyp" | b"moov" | b"mdat" | b"wide" | b"free") {
        return Some(Format::Mp4);
    }
    if b.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        return Some(Format::Webm);
    }
    if b.starts_with(b"OggS") {
        return Some(Format::Ogg);
    }
    if b.starts_with(b"fLaC") {
        return Some(Format::Flac);
    }
    if b.starts_with(b"ID3") || mp3_synced(b) {
        return Some(Format::Mp3);
    }
    None
}

/// Little helpers that read without panicking.
fn u16_le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u32_be(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_be(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

// --- WAV -------------------------------------------------------------------

/// RIFF chunks: `fmt ` gives the byte rate, `data` the length.
fn wav(b: &[u8]) -> Option<MediaInfo> {
    let mut at = 12;
    let mut byte_rate = None;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let size = u32_le(b, at + 4)? as usize;
        let body = at + 8;
        match id {
            b"fmt " => {
                let rate = u32_le(b, body + 8)?;
                byte_rate = (rate > 0).then_some(rate);
            }
            b"data" => {
                let rate = byte_rate?;
                // Streamed WAVs leave the size 0 or all ones: use what is there.
                let len = if size == 0 || size == u32::MAX as usize {
                    b.len() - body
                } else {
                    size
                };
                return Some(MediaInfo {
                    duration_ms: Some(len as u64 * 1000 / u64::from(rate)),
                    ..MediaInfo::default()
                });
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
    None
}

// --- GIF -------------------------------------------------------------------

/// The logical screen size; the duration is the sum of the frame delays,
/// given only when the whole stream up to the trailer is there.
fn gif(b: &[u8]) -> Option<MediaInfo> {
    let width = u16_le(b, 6)?;
    let height = u16_le(b, 8)?;
    let mut info = MediaInfo {
        width: Some(u32::from(width)),
        height: Some(u32::from(height)),
        duration_ms: None,
    };
    let flags = *b.get(10)?;
    let mut at = 13;
    if flags & 0x80 != 0 {
        at += 3 << ((flags & 0x07) + 1);
    }
    let mut delay_cs: u64 = 0;
    let mut timed = false;
    loop {
        match *b.get(at)? {
            0x21 => {
                let label = *b.get(at + 1)?;
                if label == 0xf9 && *b.get(at + 2)? >= 4 {
                    delay_cs += u64::from(u16_le(b, at + 4)?);
                    timed = true;
                }
                at = skip_sub_blocks(b, at + 2)?;
            }
            0x2c => {
                let flags = *b.get(at + 9)?;
                at += 10;
                if flags & 0x80 != 0 {
                    at += 3 << ((flags & 0x07) + 1);
                }
                at += 1; // LZW minimum code size
                at = skip_sub_blocks(b, at)?;
            }
            0x3b => {
                if timed {
                    info.duration_ms = Some(delay_cs * 10);
                }
                return Some(info);
            }
            _ => return Some(info),
        }
    }
}

/// Past a run of data sub-blocks (length-prefixed, ended by a 0 length).
fn skip_sub_blocks(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = usize::from(*b.get(at)?);
        at += 1;
        if len == 0 {
            return Some(at);
        }
        at += len;
        if at > b.len() {
            return None;
        }
    }
}

// --- MP4 / MOV ---------------------------------------------------------------

/// One ISO-BMFF box: its type and its content.
fn boxes(b: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let size32 = u32_be(b, at)?;
        let kind: [u8; 4] = b.get(at + 4..at + 8)?.try_into().ok()?;
        let (header, size) = match size32 {
            0 => (8, b.len() - at),
            1 => (16, usize::try_from(u64_be(b, at + 8)?).ok()?),
            n => (8, n as usize),
        };
        if size < header {
            return None;
        }
        let end = at.checked_add(size)?;
        let content = b.get(at + header..end)?;
        at = end;
        Some((kind, content))
    })
}

fn child<'a>(b: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    boxes(b).find(|(k, _)| k == kind).map(|(_, c)| c)
}

/// `moov/mvhd` → duration; the first video `trak/tkhd` → width and height
/// (16.16 fixed point).
fn mp4(b: &[u8]) -> Option<MediaInfo> {
    let moov = child(b, b"moov")?;
    let mut info = MediaInfo::default();
    if let Some(mvhd) = child(moov, b"mvhd") {
        let (timescale, duration) = match *mvhd.first()? {
            1 => (u32_be(mvhd, 20)?, u64_be(mvhd, 24)?),
            _ => (u32_be(mvhd, 12)?, u64::from(u32_be(mvhd, 16)?)),
        };
        let unknown = duration == u64::MAX || duration == u64::from(u32::MAX);
        if timescale > 0 && !unknown {
            let ms = u128::from(duration) * 1000 / u128::from(timescale);
            info.duration_ms = u64::try_from(ms).ok();
        }
    }
    let mut fallback = None;
    for (kind, trak) in boxes(moov) {
        if &kind != b"trak" {
            continue;
        }
        let Some(size) = child(trak, b"tkhd").and_then(tkhd_size) else {
            continue;
        };
        let handler = child(trak, b"mdia")
            .and_then(|mdia| child(mdia, b"hdlr"))
            .and_then(|hdlr| hdlr.get(8..12));
        if handler == Some(b"vide") {
            fallback = Some(size);
            break;
        }
        if handler.is_none() && fallback.is_none() && size != (0, 0) {
            fallback = Some(size);
        }
    }
    if let Some((w, h)) = fallback.filter(|s| *s != (0, 0)) {
        info.width = Some(w);
        info.height = Some(h);
    }
    Some(info)
}

fn tkhd_size(tkhd: &[u8]) -> Option<(u32, u32)> {
    let at = match *tkhd.first()? {
        1 => 88,
        _ => 76,
    };
    Some((u32_be(tkhd, at)? >> 16, u32_be(tkhd, at + 4)? >> 16))
}

// --- MP3 -------------------------------------------------------------------

struct Mp3Frame {
    len: usize,
    samples: u32,
    sample_rate: u32,
}

/// An MPEG audio frame header at the start of `b`.
fn mp3_header(b: &[u8]) -> Option<Mp3Frame> {
    let h = u32_be(b, 0)?;
    if h >> 21 != 0x7ff {
        return None;
    }
    let version = (h >> 19) & 3; // 3: MPEG1, 2: MPEG2, 0: MPEG2.5
    let layer = (h >> 17) & 3; // 1: III, 2: II, 3: I
    let bitrate_index = ((h >> 12) & 0xf) as usize;
    let rate_index = ((h >> 10) & 3) as usize;
    let padding = (h >> 9) & 1;
    if version == 1 || layer == 0 || bitrate_index == 0 || bitrate_index == 15 || rate_index == 3 {
        return None;
    }
    let mpeg1 = version == 3;
    const V1: [[u32; 16]; 3] = [
        [
            0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 0,
        ],
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 0,
        ],
        [
            0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0,
        ],
    ];
    const V2: [[u32; 16]; 2] = [
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256, 0,
        ],
        [
            0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0,
        ],
    ];
    let kbps = match (mpeg1, layer) {
        (true, 3) => V1[0][bitrate_index],
        (true, 2) => V1[1][bitrate_index],
        (true, _) => V1[2][bitrate_index],
        (false, 3) => V2[0][bitrate_index],
        (false, _) => V2[1][bitrate_index],
    };
    let base_rate = [44_100, 48_000, 32_000][rate_index];
    let sample_rate = match version {
        3 => base_rate,
        2 => base_rate / 2,
        _ => base_rate / 4,
    };
    let bitrate = kbps * 1000;
    let (len, samples) = match layer {
        3 => ((12 * bitrate / sample_rate + padding) * 4, 384),
        2 => (144 * bitrate / sample_rate + padding, 1152),
        _ if mpeg1 => (144 * bitrate / sample_rate + padding, 1152),
        _ => (72 * bitrate / sample_rate + padding, 576),
    };
    (len >= 4).then_some(Mp3Frame {
        len: len as usize,
        samples,
        sample_rate,
    })
}

/// Two MPEG audio frames in a row: one header alone is too easily found
/// in random bytes.
fn mp3_synced(b: &[u8]) -> bool {
    mp3_header(b).is_some_and(|f| b.get(f.len..).and_then(mp3_header).is_some())
}

/// Skip an ID3v2 tag, then count frames (at least two). A Xing/Info header in the first
/// frame gives the frame count of the whole file.
fn mp3(b: &[u8]) -> Option<MediaInfo> {
    let mut at = 0;
    if b.starts_with(b"ID3") {
        let size = b.get(6..10)?;
        if size.iter().any(|x| x & 0x80 != 0) {
            return None;
        }
        let tag = size.iter().fold(0usize, |n, x| (n << 7) | usize::from(*x));
        let footer = if b.get(5)? & 0x10 != 0 { 10 } else { 0 };
        at = 10 + tag + footer;
    }
    let first = mp3_header(b.get(at..)?)?;
    if let Some(frames) = xing_frames(b.get(at..at + first.len.min(b.len() - at))?) {
        let ms = u64::from(frames) * u64::from(first.samples) * 1000 / u64::from(first.sample_rate);
        return Some(MediaInfo {
            duration_ms: Some(ms),
            ..MediaInfo::default()
        });
    }
    let mut samples: u64 = 0;
    let mut frames = 0;
    while let Some(frame) = b.get(at..).and_then(mp3_header) {
        if at + frame.len > b.len() {
            break;
        }
        samples += u64::from(frame.samples);
        frames += 1;
        at += frame.len;
    }
    if frames < 2 {
        return None;
    }
    Some(MediaInfo {
        duration_ms: Some(samples * 1000 / u64::from(first.sample_rate)),
        ..MediaInfo::default()
    })
}

/// The frame count of a Xing/Info (VBR) header, if the frame has one.
fn xing_frames(frame: &[u8]) -> Option<u32> {
    let pos = frame
        .windows(4)
        .take(64)
        .position(|w| w == b"Xing" || w == b"Info")?;
    let flags = u32_be(frame, pos + 4)?;
    (flags & 1 != 0).then(|| u32_be(frame, pos + 8)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp4_box(kind: &[u8; 4], content: &[u8]) -> Vec<u8> {
        let mut out = ((content.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(content);
        out
    }

    fn mvhd(timescale: u32, duration: u32) -> Vec<u8> {
        let mut c = vec![0u8; 100];
        c[12..16].copy_from_slice(&timescale.to_be_bytes());
        c[16..20].copy_from_slice(&duration.to_be_bytes());
        mp4_box(b"mvhd", &c)
    }

    fn tkhd(width: u32, height: u32) -> Vec<u8> {
        let mut c = vec![0u8; 84];
        c[76..80].copy_from_slice(&(width << 16).to_be_bytes());
        c[80..84].copy_from_slice(&(height << 16).to_be_bytes());
        mp4_box(b"tkhd", &c)
    }

    fn hdlr(handler: &[u8; 4]) -> Vec<u8> {
        let mut c = vec![0u8; 25];
        c[8..12].copy_from_slice(handler);
        mp4_box(b"hdlr", &c)
    }

    fn trak(width: u32, height: u32, handler: &[u8; 4]) -> Vec<u8> {
        let mut c = tkhd(width, height);
        c.extend(mp4_box(b"mdia", &hdlr(handler)));
        mp4_box(b"trak", &c)
    }

    /// ftyp + moov(mvhd + an audio trak + a 1280×720 video trak), 12.5 s.
    fn minimal_mp4() -> Vec<u8> {
        let mut out = mp4_box(b"ftyp", b"isom\0\0\x02\0isomiso2mp41");
        let mut moov = mvhd(1000, 12_500);
        moov.extend(trak(0, 0, b"soun"));
        moov.extend(trak(1280, 720, b"vide"));
        out.extend(mp4_box(b"moov", &moov));
        out.extend(mp4_box(b"mdat", &[0u8; 32]));
        out
    }

    #[test]
    fn mp4_gives_size_and_duration() {
        let info = probe(&minimal_mp4(), "video/mp4");
        assert_eq!(
            info,
            MediaInfo {
                width: Some(1280),
                height: Some(720),
                duration_ms: Some(12_500)
            }
        );
        // The content type does not matter when the bytes say what they are.
        assert_eq!(probe(&minimal_mp4(), "application/octet-stream"), info);
    }

    #[test]
    fn mp4_version_1_headers() {
        let mut c = vec![1u8, 0, 0, 0];
        c.extend([0u8; 16]);
        c.extend(90_000u32.to_be_bytes());
        c.extend(270_000u64.to_be_bytes());
        c.extend([0u8; 80]);
        let moov = mp4_box(b"moov", &mp4_box(b"mvhd", &c));
        assert_eq!(probe(&moov, "video/quicktime").duration_ms, Some(3_000));
    }

    #[test]
    fn wav_duration() {
        let mut wav = b"RIFF\0\0\0\0WAVEfmt ".to_vec();
        wav.extend(16u32.to_le_bytes());
        wav.extend(1u16.to_le_bytes());
        wav.extend(1u16.to_le_bytes());
        wav.extend(8000u32.to_le_bytes());
        wav.extend(16000u32.to_le_bytes());
        wav.extend(2u16.to_le_bytes());
        wav.extend(16u16.to_le_bytes());
        wav.extend(b"LIST");
        wav.extend(3u32.to_le_bytes());
        wav.extend([0u8; 4]); // 3 bytes + 1 pad
        wav.extend(b"data");
        wav.extend(8000u32.to_le_bytes());
        wav.extend(vec![0u8; 8000]);
        assert_eq!(probe(&wav, "audio/wav").duration_ms, Some(500));
    }

    fn minimal_gif(delays_cs: &[u16]) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend(10u16.to_le_bytes());
        g.extend(6u16.to_le_bytes());
        g.extend([0x80, 0, 0]); // global table of 2 colours
        g.extend([0, 0, 0, 255, 255, 255]);
        for d in delays_cs {
            g.extend([0x21, 0xf9, 4, 0]);
            g.extend(d.to_le_bytes());
            g.extend([0, 0]);
            g.extend([0x2c, 0, 0, 0, 0, 10, 0, 6, 0, 0]);
            g.extend([2, 2, 0x4c, 0x01, 0]); // a tiny LZW stream
        }
        g.push(0x3b);
        g
    }

    #[test]
    fn gif_size_and_delays() {
        let info = probe(&minimal_gif(&[10, 20, 5]), "image/gif");
        assert_eq!(
            info,
            MediaInfo {
                width: Some(10),
                height: Some(6),
                duration_ms: Some(350)
            }
        );
    }

    fn mp3_frames(n: usize) -> Vec<u8> {
        // MPEG1 layer III, 128 kbps, 44.1 kHz, no padding: 417 bytes, 1152 samples.
        let mut out = Vec::new();
        for _ in 0..n {
            out.extend([0xff, 0xfb, 0x90, 0x00]);
            out.extend(vec![0u8; 413]);
        }
        out
    }

    #[test]
    fn mp3_counts_frames() {
        let mut file = b"ID3\x04\0\0\0\0\0\x0a".to_vec();
        file.extend([0u8; 10]);
        file.extend(mp3_frames(100));
        // 100 × 1152 / 44100 s
        assert_eq!(probe(&file, "audio/mpeg").duration_ms, Some(2612));
    }

    #[test]
    fn mp3_xing_frame_count() {
        let mut first = vec![0xff, 0xfb, 0x90, 0x00];
        first.extend([0u8; 32]);
        first.extend(b"Xing");
        first.extend(1u32.to_be_bytes());
        first.extend(1000u32.to_be_bytes());
        first.resize(417, 0);
        first.extend(mp3_frames(3));
        assert_eq!(probe(&first, "audio/mpeg").duration_ms, Some(26_122));
    }

    #[test]
    fn extensions() {
        assert_eq!(extension_for("video/mp4"), "mp4");
        assert_eq!(extension_for("audio/mpeg"), "mp3");
        assert_eq!(extension_for("Audio/WAV; codecs=1"), "wav");
        assert_eq!(extension_for("image/gif"), "gif");
        assert_eq!(extension_for("video/webm"), "webm");
        assert_eq!(extension_for("text/plain; charset=utf-8"), "txt");
        assert_eq!(extension_for("application/x-unknown"), "bin");
        assert_eq!(extension_for(""), "bin");
    }

    /// xorshift: deterministic "random" bytes without a dependency.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const TYPES: &[&str] = &[
        "video/mp4",
        "audio/wav",
        "image/gif",
        "audio/mpeg",
        "",
        "video/webm",
    ];

    #[test]
    fn random_bytes_give_nothing_and_never_panic() {
        for seed in 0..2_000u64 {
            let bytes = noise(seed, (seed as usize * 7) % 600);
            for ct in TYPES {
                assert_eq!(probe(&bytes, ct), MediaInfo::default(), "seed {seed} {ct}");
            }
        }
        assert_eq!(probe(&[], "video/mp4"), MediaInfo::default());
    }

    #[test]
    fn truncated_files_never_panic_nor_invent_values() {
        let samples: Vec<(Vec<u8>, &str)> = vec![
            (minimal_mp4(), "video/mp4"),
            (minimal_gif(&[10, 20, 5]), "image/gif"),
            (
                crate::providers::local::speech_wav("truncate me please"),
                "audio/wav",
            ),
            (mp3_frames(20), "audio/mpeg"),
        ];
        for (full, ct) in samples {
            let whole = probe(&full, ct);
            for cut in 0..full.len() {
                let info = probe(&full[..cut], ct);
                if ct == "audio/mpeg" {
                    // Fewer frames play for less time.
                    assert!(info.duration_ms <= whole.duration_ms);
                    continue;
                }
                for (part, of_whole) in [
                    (info.width.map(u64::from), whole.width.map(u64::from)),
                    (info.height.map(u64::from), whole.height.map(u64::from)),
                    (info.duration_ms, whole.duration_ms),
                ] {
                    assert!(
                        part.is_none() || part == of_whole,
                        "{ct} cut at {cut}: {info:?}"
                    );
                }
            }
            assert_eq!(probe(&full[..4.min(full.len())], ct), MediaInfo::default());
        }
    }

    #[test]
    fn corrupted_files_never_panic() {
        for (full, ct) in [
            (minimal_mp4(), "video/mp4"),
            (minimal_gif(&[10, 20]), "image/gif"),
            (mp3_frames(5), "audio/mpeg"),
        ] {
            for seed in 0..300u64 {
                let mut bytes = full.clone();
                for (i, n) in noise(seed, 4).iter().enumerate() {
                    let at = (usize::from(*n) * 31 + i * 97 + seed as usize) % bytes.len();
                    bytes[at] = noise(seed + i as u64, 1)[0];
                }
                let _ = probe(&bytes, ct);
            }
        }
    }
}
