//! The offline provider, for the demo and tests: no network, real media
//! made in-process and deterministic for a given request.
//!
//! - voiceover → a WAV (PCM 16-bit mono, 16 kHz): one tone per word, so its
//!   length follows the text (`speech_duration_ms`);
//! - video → an animated GIF, 64×36, 4 frames a second for `duration`
//!   seconds (default 2);
//! - script → text derived from the prompt;
//! - transcription → a fixed transcript (the input is not fetched).
//!
//! Parameters that steer it (others are ignored, so the same parameters as
//! for a real provider work): `delay_ms` (sleep first, ≤ 60 000),
//! `fail` (`"transient"`, `"permanent"` → `content_policy`, `"timeout"`),
//! `pending_polls` (answer `Pending`, then `Running` for that many polls,
//! then `Done`; kept in memory, so a restarted process finds the handle
//! unknown, `not_found`), `duration` (video seconds, 1–12).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::{Kind, Output, Polled, ProviderError, ProviderRequest, Started, codes};

pub const NAME: &str = "local";
pub const MAX_DELAY_MS: u64 = 60_000;
pub const SAMPLE_RATE: u32 = 16_000;
pub const GIF_WIDTH: u16 = 64;
pub const GIF_HEIGHT: u16 = 36;
/// Frames per second of the local video (a frame delay of 25 cs).
pub const GIF_FPS: u16 = 4;
pub const DEFAULT_VIDEO_SECONDS: u16 = 2;
pub const TRANSCRIPT: &str = "This is a local transcript: the audio was not sent anywhere.";

#[derive(Debug, Default)]
pub struct LocalProvider {
    pending: Mutex<HashMap<String, PendingJob>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct PendingJob {
    polls_left: u32,
    output: Output,
}

impl LocalProvider {
    pub fn new() -> Self {
        Self::default()
    }

    pub async fn start(&self, req: &ProviderRequest) -> Result<Started, ProviderError> {
        let params = match &req.parameters {
            Value::Null => serde_json::Map::new(),
            Value::Object(m) => m.clone(),
            _ => return Err(ProviderError::invalid("parameters must be a JSON object")),
        };
        if let Some(v) = params.get("delay_ms") {
            let ms = v.as_u64().filter(|ms| *ms <= MAX_DELAY_MS).ok_or_else(|| {
                ProviderError::invalid(format!("delay_ms must be 0 to {MAX_DELAY_MS}"))
            })?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        match params.get("fail").map(|v| v.as_str().ok_or(v)) {
            None => {}
            Some(Ok("transient")) => {
                return Err(ProviderError::Transient(
                    "local: transient failure on demand".into(),
                ));
            }
            Some(Ok("permanent")) => {
                return Err(ProviderError::permanent(
                    codes::CONTENT_POLICY,
                    "local: refusal on demand",
                ));
            }
            Some(Ok("timeout")) => return Err(ProviderError::Timeout),
            Some(_) => {
                return Err(ProviderError::invalid(
                    "fail must be transient, permanent or timeout",
                ));
            }
        }
        let output = make(req, &params)?;
        let polls = match params.get("pending_polls") {
            None => 0,
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 1_000)
                .ok_or_else(|| ProviderError::invalid("pending_polls must be 0 to 1000"))?
                as u32,
        };
        if polls == 0 {
            return Ok(Started::Done(output));
        }
        let handle = format!("local-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        self.jobs().insert(
            handle.clone(),
            PendingJob {
                polls_left: polls,
                output,
            },
        );
        Ok(Started::Pending { handle })
    }

    pub fn poll(&self, handle: &str) -> Result<Polled, ProviderError> {
        let mut jobs = self.jobs();
        let job = jobs
            .get_mut(handle)
            .ok_or_else(|| ProviderError::permanent(codes::NOT_FOUND, "local: unknown handle"))?;
        if job.polls_left > 0 {
            job.polls_left -= 1;
            return Ok(Polled::Running);
        }
        let job = jobs.remove(handle).expect("present");
        Ok(Polled::Done(job.output))
    }

    pub fn cancel(&self, handle: &str) {
        self.jobs().remove(handle);
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingJob>> {
        // A panic while holding the lock leaves the map usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn make(
    req: &ProviderRequest,
    params: &serde_json::Map<String, Value>,
) -> Result<Output, ProviderError> {
    let prompt = || {
        req.prompt
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| ProviderError::invalid("prompt is required"))
    };
    Ok(match req.kind {
        Kind::Voiceover => Output::MediaBytes {
            bytes: speech_wav(prompt()?),
            content_type: "audio/wav".into(),
        },
        Kind::Video => {
            let seconds = match params.get("duration") {
                None | Some(Value::Null) => DEFAULT_VIDEO_SECONDS,
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .filter(|s| (1..=12).contains(s))
                    .ok_or_else(|| ProviderError::invalid("duration must be 1 to 12 seconds"))?
                    as u16,
            };
            Output::MediaBytes {
                bytes: animated_gif(prompt()?, seconds),
                content_type: "image/gif".into(),
            }
        }
        Kind::Script => Output::Text {
            text: script(prompt()?),
        },
        Kind::Transcription => {
            if req.input_url.is_none() {
                return Err(ProviderError::invalid("input_url is required"));
            }
            Output::Text {
                text: TRANSCRIPT.into(),
            }
        }
    })
}

/// FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Per word: a 50 ms tone per character (at most 400 ms) and a 50 ms
/// pause; the whole between 300 ms and 10 s.
pub fn speech_duration_ms(text: &str) -> u64 {
    word_segments(text)
        .iter()
        .map(|(_, tone)| tone + 50)
        .sum::<u64>()
        .clamp(300, 10_000)
}

fn word_segments(text: &str) -> Vec<(u64, u64)> {
    text.split_whitespace()
        .map(|w| (fnv(w.as_bytes()), (w.chars().count() as u64 * 50).min(400)))
        .collect()
}

/// A valid WAV of `speech_duration_ms(text)`: one tone per word.
pub fn speech_wav(text: &str) -> Vec<u8> {
    let per_ms = u64::from(SAMPLE_RATE / 1000);
    let total = speech_duration_ms(text) * per_ms;
    let mut samples: Vec<i16> = Vec::with_capacity(total as usize);
    for (hash, tone_ms) in word_segments(text) {
        let freq = 220.0 + (hash % 660) as f64;
        let n = tone_ms * per_ms;
        let fade = (10 * per_ms).min(n / 2).max(1);
        for i in 0..n {
            let t = i as f64 / f64::from(SAMPLE_RATE);
            let edge = i.min(n - 1 - i).min(fade) as f64 / fade as f64;
            let v = (t * freq * std::f64::consts::TAU).sin() * 0.3 * edge;
            samples.push((v * f64::from(i16::MAX)) as i16);
        }
        samples.extend(std::iter::repeat_n(0, (50 * per_ms) as usize));
    }
    // Pad (short texts) or cut (long ones) to the announced length.
    samples.resize(total as usize, 0);
    wav(&samples)
}

fn wav(samples: &[i16]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    out.extend_from_slice(&(SAMPLE_RATE * 2).to_le_bytes()); // byte rate
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// A valid animated GIF, `GIF_WIDTH`×`GIF_HEIGHT`, `GIF_FPS` frames a
/// second for `seconds`: a square crossing a two-tone background whose
/// colours come from the prompt.
pub fn animated_gif(prompt: &str, seconds: u16) -> Vec<u8> {
    let hash = fnv(prompt.as_bytes());
    let colour = |shift: u32| -> [u8; 3] {
        let h = hash.rotate_right(shift);
        [
            (h & 0xff) as u8,
            ((h >> 8) & 0xff) as u8,
            ((h >> 16) & 0xff) as u8,
        ]
    };
    let mut palette = Vec::with_capacity(12);
    for c in [colour(0), colour(24), [255, 255, 255], [0, 0, 0]] {
        palette.extend_from_slice(&c);
    }
    let (w, h) = (usize::from(GIF_WIDTH), usize::from(GIF_HEIGHT));
    let frames = usize::from(seconds.max(1) * GIF_FPS);
    let side = 12;
    let mut out = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut out, GIF_WIDTH, GIF_HEIGHT, &palette)
            .expect("writing to a Vec cannot fail");
        encoder
            .set_repeat(gif::Repeat::Infinite)
            .expect("writing to a Vec cannot fail");
        for f in 0..frames {
            let x0 = if frames > 1 {
                f * (w - side) / (frames - 1)
            } else {
                0
            };
            let y0 = (h - side) / 2;
            let mut pixels = vec![0u8; w * h];
            for (i, p) in pixels.iter_mut().enumerate() {
                let (x, y) = (i % w, i / w);
                *p = if (x0..x0 + side).contains(&x) && (y0..y0 + side).contains(&y) {
                    2
                } else if y >= h * 3 / 4 {
                    3
                } else {
                    u8::from((x / 8 + y / 8 + f) % 2 == 1)
                };
            }
            let mut frame = gif::Frame::from_indexed_pixels(GIF_WIDTH, GIF_HEIGHT, pixels, None);
            frame.delay = 100 / GIF_FPS;
            encoder
                .write_frame(&frame)
                .expect("writing to a Vec cannot fail");
        }
    }
    out
}

/// A short script derived from the prompt, the same every time.
pub fn script(prompt: &str) -> String {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let title: Vec<String> = words
        .iter()
        .take(6)
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        })
        .collect();
    let subject = words.iter().take(3).copied().collect::<Vec<_>>().join(" ");
    format!(
        "TITLE: {}\n\n\
         SCENE 1. Wide opening shot.\nNARRATION: {}\n\n\
         SCENE 2. Close-up on {}.\nNARRATION: Look closer, and the details tell the story.\n\n\
         SCENE 3. Slow pull back as the title fades in.\nNARRATION: That's the idea, in {} words.\n",
        title.join(" "),
        words.join(" "),
        subject,
        words.len()
    )
}
