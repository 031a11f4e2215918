//! Where pusher is: one URL (one stream), or a DNS name whose addresses each get a stream.
//!
//! `--pusher-url` forms:
//! - `http://HOST:PORT`, `https://HOST:PORT`: one stream. HOST is resolved by the operating
//!   system at each connect, so behind a Kubernetes ClusterIP Service the stream lands on
//!   whichever pod the connection is balanced to.
//! - `dns:///HOST:PORT`: every address HOST resolves to (system resolver: /etc/hosts, then the
//!   nameservers and search domains of /etc/resolv.conf) gets its own stream, re-resolved
//!   periodically. Meant for a headless Service: `dns:///pusher-headless.NS.svc.cluster.local:50052`.
//! - `dns://SERVER[:PORT]/HOST:PORT`: the same, asking the nameserver at SERVER (an IP
//!   address; port 53 by default) directly, as in gRPC's naming syntax.
//!
//! With a `dns:` URL the link speaks TLS when `--pusher-tls-ca` is given, and checks pusher's
//! certificate against HOST (or `--pusher-tls-domain`).

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{Resolver as DnsResolver, TokioResolver};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One stream to this `http(s)://` URL; `endpoint` is its `host:port` (the metric label).
    Url { url: String, endpoint: String },
    /// One stream per address of `host`, asked of `server` or of the system resolver.
    Dns {
        server: Option<SocketAddr>,
        host: String,
        port: u16,
    },
}

impl Target {
    /// Parses a `--pusher-url`; the error says what form was expected.
    pub fn parse(url: &str) -> Result<Target, String> {
        const FORMS: &str = "expected http://HOST:PORT, https://HOST:PORT, dns:///HOST:PORT or \
                             dns://DNS_SERVER/HOST:PORT";
        if let Some(rest) = url.strip_prefix("dns:") {
            let (server, name) = match rest.strip_prefix("//") {
                Some(rest) => {
                    let (authority, name) = rest
                        .split_once('/')
                        .ok_or_else(|| format!("--pusher-url {url:?}: {FORMS}"))?;
                    let server = match authority {
                        "" => None,
                        authority => Some(parse_server(authority).ok_or_else(|| {
                            format!(
                                "--pusher-url {url:?}: the DNS server {authority:?} must be an IP \
                                 address with an optional port (dns://10.96.0.10:53/HOST:PORT)"
                            )
                        })?),
                    };
                    (server, name)
                }
                None => (None, rest),
            };
            let (host, port) = name
                .rsplit_once(':')
                .ok_or_else(|| format!("--pusher-url {url:?}: the name needs a port ({FORMS})"))?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("--pusher-url {url:?}: {port:?} is not a port"))?;
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
            if !valid {
                return Err(format!(
                    "--pusher-url {url:?}: {host:?} is not a DNS name ({FORMS})"
                ));
            }
            return Ok(Target::Dns {
                server,
                host: host.to_string(),
                port,
            });
        }
        let uri = url
            .parse::<tonic::transport::Uri>()
            .map_err(|e| format!("--pusher-url {url:?} is not a URL: {e} ({FORMS})"))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(authority)) => Ok(Target::Url {
                url: url.to_string(),
                endpoint: authority.to_string(),
            }),
            _ => Err(format!("--pusher-url {url:?}: {FORMS}")),
        }
    }

    /// The name pusher's certificate is checked against, when the URL implies one.
    pub fn host(&self) -> Option<&str> {
        match self {
            Target::Url { .. } => None,
            Target::Dns { host, .. } => Some(host),
        }
    }
}

fn parse_server(authority: &str) -> Option<SocketAddr> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = authority.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

/// Looks up a [`Target::Dns`]'s addresses.
pub(crate) enum Resolver {
    System {
        host: String,
        port: u16,
    },
    Server {
        resolver: Box<TokioResolver>,
        host: String,
        port: u16,
    },
}

impl Resolver {
    /// `None` for a [`Target::Url`]: tonic connects to it by name.
    pub(crate) fn for_target(target: &Target, timeout: Duration) -> Option<Resolver> {
        let Target::Dns { server, host, port } = target else {
            return None;
        };
        let (host, port) = (host.clone(), *port);
        Some(match server {
            None => Resolver::System { host, port },
            Some(server) => {
                let config = ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true),
                );
                let mut options = ResolverOpts::default();
                // Every lookup asks the server: pods come and go faster than TTLs suggest.
                options.cache_size = 0;
                options.timeout = timeout;
                options.attempts = 1;
                let resolver =
                    DnsResolver::builder_with_config(config, TokioConnectionProvider::default())
                        .with_options(options)
                        .build();
                Resolver::Server {
                    resolver: Box::new(resolver),
                    host,
                    port,
                }
            }
        })
    }

    /// The name's addresses, sorted and without duplicates; an error when there are none.
    pub(crate) async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let mut addrs: Vec<SocketAddr> = match self {
            Resolver::System { host, port } => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .collect(),
            Resolver::Server {
                resolver,
                host,
                port,
            } => resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .iter()
                .map(|ip| SocketAddr::new(ip, *port))
                .collect(),
        };
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            let host = match self {
                Resolver::System { host, .. } | Resolver::Server { host, .. } => host,
            };
            return Err(format!("{host} resolved to no addresses"));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            Target::parse("http://pusher:50052"),
            Ok(Target::Url {
                url: "http://pusher:50052".into(),
                endpoint: "pusher:50052".into()
            })
        );
        assert!(matches!(
            Target::parse("https://10.0.0.1:443"),
            Ok(Target::Url { .. })
        ));
        assert_eq!(
            Target::parse("dns:///pusher-headless.ns.svc.cluster.local:50052"),
            Ok(Target::Dns {
                server: None,
                host: "pusher-headless.ns.svc.cluster.local".into(),
                port: 50052
            })
        );
        assert_eq!(
            Target::parse("dns:pusher:1"),
            Ok(Target::Dns {
                server: None,
                host: "pusher".into(),
                port: 1
            })
        );
        assert_eq!(
            Target::parse("dns://127.0.0.1:5353/pusher.test:50052"),
            Ok(Target::Dns {
                server: Some("127.0.0.1:5353".parse().unwrap()),
                host: "pusher.test".into(),
                port: 50052
            })
        );
        assert_eq!(
            Target::parse("dns://10.96.0.10/p:2"),
            Ok(Target::Dns {
                server: Some("10.96.0.10:53".parse().unwrap()),
                host: "p".into(),
                port: 2
            })
        );
    }

    #[test]
    fn rejects_with_a_reason() {
        for (url, reason) in [
            ("dns:///pusher", "needs a port"),
            ("dns:///pusher:0", "not a port"),
            ("dns:///pusher:x", "not a port"),
            ("dns:///:50052", "not a DNS name"),
            ("dns:///pu sher:1", "not a DNS name"),
            ("dns://kube-dns/pusher:1", "must be an IP address"),
            ("dns://10.0.0.1", "expected"),
            ("ftp://host:1", "expected"),
            ("not a url", "not a URL"),
        ] {
            let error = Target::parse(url).unwrap_err();
            assert!(error.contains("--pusher-url"), "{url}: {error}");
            assert!(error.contains(reason), "{url}: {error}");
        }
    }

    /// Against a real DNS server on loopback (UDP): every address, sorted; changes seen on
    /// the next lookup (no cache); an unknown name is an error that names it.
    #[tokio::test]
    async fn a_named_server_is_asked_every_time() {
        let ips = ["127.0.0.3", "127.0.0.1", "127.0.0.2"].map(|ip| ip.parse().unwrap());
        let dns = ::tests::dns::TestDns::start("pusher.test", &ips).await;
        let target = Target::parse(&dns.url(50052)).unwrap();
        let resolver = Resolver::for_target(&target, Duration::from_secs(2)).unwrap();
        let found = resolver.resolve().await.unwrap();
        let expected: Vec<SocketAddr> = ["127.0.0.1:50052", "127.0.0.2:50052", "127.0.0.3:50052"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        assert_eq!(found, expected);

        dns.set(&ips[1..2]);
        assert_eq!(
            resolver.resolve().await.unwrap(),
            vec!["127.0.0.1:50052".parse().unwrap()]
        );
        dns.set(&[]);
        let error = resolver.resolve().await.unwrap_err();
        assert!(error.contains("pusher.test"), "{error}");
        assert!(dns.queries() >= 3);

        let other = Target::parse(&format!("dns://{}/other.test:1", dns.addr)).unwrap();
        let error = Resolver::for_target(&other, Duration::from_secs(2))
            .unwrap()
            .resolve()
            .await
            .unwrap_err();
        assert!(error.contains("other.test"), "{error}");
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost() {
        let target = Target::parse("dns:///localhost:50052").unwrap();
        let resolver = Resolver::for_target(&target, Duration::from_secs(2)).unwrap();
        let addrs = resolver.resolve().await.unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 50052)
        );
        assert!(!addrs.is_empty());
    }
}
