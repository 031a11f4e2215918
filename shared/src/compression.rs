//! gRPC message compression (https://github.com/grpc/grpc/blob/master/doc/compression.md).
//!
//! Every server of ours **accepts** gzip, deflate and zstd request messages, on every service
//! (health and reflection included: a client channel created with compression compresses all
//! its calls). tonic refuses a compressed message with UNIMPLEMENTED unless each generated
//! server opts in, so [`Compressible::with_compression`] is applied to every server we add.
//!
//! **Responses** are sent uncompressed unless the operator lists algorithms in
//! `--response-compression`; then a response is compressed with the first algorithm in the
//! client's `grpc-accept-encoding` that the list enables, and sent plain to a client that
//! accepts none of them. Compression costs CPU on the hot path, so the default pays none.

use std::fmt;
use std::str::FromStr;
use tonic::codec::CompressionEncoding;

/// One compression algorithm, as named in `grpc-encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Gzip,
    Deflate,
    Zstd,
}

impl Algorithm {
    /// Every algorithm we accept, in the order we prefer them.
    pub const ALL: [Algorithm; 3] = [Algorithm::Gzip, Algorithm::Deflate, Algorithm::Zstd];

    pub fn encoding(self) -> CompressionEncoding {
        match self {
            Algorithm::Gzip => CompressionEncoding::Gzip,
            Algorithm::Deflate => CompressionEncoding::Deflate,
            Algorithm::Zstd => CompressionEncoding::Zstd,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Gzip => "gzip",
            Algorithm::Deflate => "deflate",
            Algorithm::Zstd => "zstd",
        }
    }
}

/// A set of algorithms from a flag: `none`, or a comma-separated list of `gzip`, `deflate`,
/// `zstd` (for `--response-compression`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Algorithms(pub Vec<Algorithm>);

impl FromStr for Algorithms {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        // Empty too: a templated manifest often sets the variable to nothing.
        match value.trim() {
            "none" | "" => return Ok(Algorithms(Vec::new())),
            "all" => return Ok(Algorithms(Algorithm::ALL.to_vec())),
            _ => {}
        }
        let mut algorithms = Vec::new();
        for name in value.split(',').map(str::trim) {
            let algorithm = Algorithm::ALL
                .into_iter()
                .find(|a| a.name() == name)
                .ok_or_else(|| {
                    format!("unknown compression {name:?}: use none, all, or a comma-separated list of gzip, deflate, zstd")
                })?;
            if !algorithms.contains(&algorithm) {
                algorithms.push(algorithm);
            }
        }
        Ok(Algorithms(algorithms))
    }
}

impl fmt::Display for Algorithms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.0.iter().map(|a| a.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// Parses `--response-compression` (for clap's `value_parser`).
pub fn parse_algorithms(value: &str) -> Result<Algorithms, String> {
    value.parse()
}

/// One algorithm or none, for messages we send (`--pusher-compression none|gzip|zstd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendCompression(pub Option<Algorithm>);

/// Parses `--pusher-compression` (for clap's `value_parser`).
pub fn parse_one(value: &str) -> Result<SendCompression, String> {
    let one_of = || format!("{value:?}: use one of none, gzip, deflate, zstd");
    if value.trim() == "all" {
        return Err(one_of());
    }
    match value
        .parse::<Algorithms>()
        .map_err(|_| one_of())?
        .0
        .as_slice()
    {
        [] => Ok(SendCompression(None)),
        [one] => Ok(SendCompression(Some(*one))),
        _ => Err(one_of()),
    }
}

/// A generated gRPC server (or client) whose compression can be configured. tonic generates
/// these methods on each type rather than in a trait, hence this one.
pub trait Compressible: Sized {
    fn accept_compressed(self, encoding: CompressionEncoding) -> Self;
    fn send_compressed(self, encoding: CompressionEncoding) -> Self;

    /// Accepts every algorithm in [`Algorithm::ALL`]; compresses responses with those in
    /// `respond` that the peer accepts.
    fn with_compression(self, respond: &Algorithms) -> Self {
        let server = Algorithm::ALL
            .into_iter()
            .fold(self, |s, a| s.accept_compressed(a.encoding()));
        respond
            .0
            .iter()
            .fold(server, |s, a| s.send_compressed(a.encoding()))
    }
}

macro_rules! compressible {
    ($($server:ty where $param:ident: $bound:path;)*) => {$(
        impl<$param: $bound> Compressible for $server {
            fn accept_compressed(self, encoding: CompressionEncoding) -> Self {
                <$server>::accept_compressed(self, encoding)
            }
            fn send_compressed(self, encoding: CompressionEncoding) -> Self {
                <$server>::send_compressed(self, encoding)
            }
        }
    )*};
}

use crate::proto::{listen::v1 as listen, pusher::v1 as pusher};
use tonic_health::pb::health_server;
use tonic_reflection::pb::{v1 as reflection_v1, v1alpha as reflection_v1alpha};

compressible! {
    listen::listen_server::ListenServer<T> where T: listen::listen_server::Listen;
    pusher::pusher_server::PusherServer<T> where T: pusher::pusher_server::Pusher;
    health_server::HealthServer<T> where T: health_server::Health;
    reflection_v1::server_reflection_server::ServerReflectionServer<T>
        where T: reflection_v1::server_reflection_server::ServerReflection;
    reflection_v1alpha::server_reflection_server::ServerReflectionServer<T>
        where T: reflection_v1alpha::server_reflection_server::ServerReflection;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse_to_algorithm_lists() {
        assert_eq!("none".parse(), Ok(Algorithms::default()));
        assert_eq!(
            "zstd, gzip,zstd".parse(),
            Ok(Algorithms(vec![Algorithm::Zstd, Algorithm::Gzip]))
        );
        let error = "brotli".parse::<Algorithms>().unwrap_err();
        assert!(error.contains("\"brotli\"") && error.contains("gzip, deflate, zstd"));
        assert_eq!(Algorithms(vec![Algorithm::Gzip]).to_string(), "gzip");
        assert_eq!(parse_one("none"), Ok(SendCompression(None)));
        assert_eq!(
            parse_one("zstd"),
            Ok(SendCompression(Some(Algorithm::Zstd)))
        );
        assert!(parse_one("gzip,zstd").is_err());
    }
}
