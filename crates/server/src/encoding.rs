//! Response compression as Triton does it: only a successful inference answer is
//! compressed, and only as that request's own `Accept-Encoding` asks (gzip, or
//! deflate in its zlib framing, as tritonclient decodes it), chosen by Triton's rule.
//!
//! Everything else (metadata, statistics, repository, errors) goes out plain, because
//! `tritonclient.http.aio` turns aiohttp's automatic decompression off, always sends
//! `Accept-Encoding: gzip, deflate`, and decodes only infer responses itself.

use std::io::Write;

use axum::http::{header, HeaderMap};
use bytes::Bytes;

/// Bodies at least this large are compressed on the blocking pool, so a large
/// answer does not hold up the runtime's worker threads.
const BLOCKING_FROM: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    /// zlib framing (RFC 1950), which is what `Content-Encoding: deflate` means.
    Deflate,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// Triton's choice among identity, gzip and deflate: the highest `q` (default 1),
/// the first listed on a tie; other codings are ignored. `None`: send it plain.
pub fn negotiate(headers: &HeaderMap) -> Option<Encoding> {
    let mut best: Option<Encoding> = None;
    let mut weight = 0.0f32;
    // At most a few header values, each split on commas: bounded by the header limits.
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let mut q = 1.0f32;
            if let Some(p) = parts.next() {
                match p.trim().strip_prefix("q=").map(|q| q.trim().parse::<f32>()) {
                    Some(Ok(v)) if v.is_finite() => q = v,
                    _ => continue,
                }
            }
            let choice = if coding.eq_ignore_ascii_case("gzip") {
                Some(Encoding::Gzip)
            } else if coding.eq_ignore_ascii_case("deflate") {
                Some(Encoding::Deflate)
            } else if coding.eq_ignore_ascii_case("identity") {
                None
            } else {
                continue;
            };
            if q > weight {
                best = choice;
                weight = q;
            }
        }
    }
    best
}

fn compress_now(body: &[u8], enc: Encoding) -> std::io::Result<Vec<u8>> {
    let level = flate2::Compression::fast();
    let out = Vec::with_capacity(body.len() / 2 + 64);
    match enc {
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(out, level);
            w.write_all(body)?;
            w.finish()
        }
        Encoding::Deflate => {
            let mut w = flate2::write::ZlibEncoder::new(out, level);
            w.write_all(body)?;
            w.finish()
        }
    }
}

/// Compresses `body`; `None` if the encoder failed (the caller sends it plain).
pub async fn compress(body: Bytes, enc: Encoding) -> Option<Bytes> {
    if body.len() < BLOCKING_FROM {
        return compress_now(&body, enc).ok().map(Bytes::from);
    }
    tokio::task::spawn_blocking(move || compress_now(&body, enc))
        .await
        .ok()?
        .ok()
        .map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
        h
    }

    #[test]
    fn negotiation_follows_the_request() {
        assert_eq!(negotiate(&HeaderMap::new()), None);
        assert_eq!(negotiate(&headers("identity")), None);
        assert_eq!(negotiate(&headers("gzip")), Some(Encoding::Gzip));
        assert_eq!(negotiate(&headers("gzip, deflate")), Some(Encoding::Gzip));
        assert_eq!(negotiate(&headers("br, deflate, gzip")), Some(Encoding::Deflate));
        assert_eq!(negotiate(&headers("gzip;q=0, deflate")), Some(Encoding::Deflate));
        assert_eq!(
            negotiate(&headers("gzip;q=0.5, deflate;q=0.8")),
            Some(Encoding::Deflate)
        );
        assert_eq!(negotiate(&headers("GZIP;q=0.5")), Some(Encoding::Gzip));
        assert_eq!(negotiate(&headers("identity, gzip")), None);
        assert_eq!(negotiate(&headers("gzip;q=0")), None);
    }

    #[tokio::test]
    async fn both_codings_round_trip() {
        let body = Bytes::from(vec![7u8; 200_000]);
        let gz = compress(body.clone(), Encoding::Gzip).await.unwrap();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, body);
        let z = compress(Bytes::from_static(b"abc"), Encoding::Deflate).await.unwrap();
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(&z[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
    }
}
