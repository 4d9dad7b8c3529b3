//! The Redis URL of `--store`, parsed into a topology: one node, a Sentinel-monitored
//! master, or a Redis Cluster.
//!
//! | URL                                                                                   | topology |
//! |---------------------------------------------------------------------------------------|----------|
//! | `redis://[user:pass@]host:port[/db]`, `rediss://…`                                    | one node (or a managed primary endpoint) |
//! | `redis+sentinel://[user:pass@]host[:port][,host[:port]…]/MASTER[/db][?sentinel_username=U&sentinel_password=P]`, `rediss+sentinel://…` | the master named `MASTER`, found through the listed sentinels (default port 26379) |
//! | `redis+cluster://[user:pass@]host[:port][,host[:port]…]`, `rediss+cluster://…`          | a Redis Cluster reached through any of the listed nodes (default port 6379) |
//!
//! `user:pass` authenticate to the Redis servers that hold data (the master and its
//! replicas, or the cluster nodes); sentinels are reached without credentials unless
//! `sentinel_username` / `sentinel_password` are given. User names, passwords and
//! parameter values are percent-encoded like in any URL (`@` → `%40`, `/` → `%2F`,
//! `,` → `%2C`, `:` → `%3A`, `%` → `%25`). The `rediss` forms use TLS towards every node
//! (sentinels included) and need the `tls` cargo feature.
//!
//! The redis crate has no URL of its own for Sentinel or Cluster: this shape follows the
//! `redis+sentinel://` scheme of other clients (a comma-separated host list, the master
//! name as the first path segment, the database as the second).

use std::fmt;

use redis::{IntoConnectionInfo, RedisConnectionInfo};

/// Default port of a sentinel when a `redis+sentinel://` host has none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;
/// Default port of a Redis node when a `redis+cluster://` host has none.
pub const DEFAULT_REDIS_PORT: u16 = 6379;

/// Where the records live, as described by a `--store` URL.
#[derive(Clone)]
pub enum RedisTopology {
    /// One server: `redis://` or `rediss://`, handed to the redis crate as is.
    Single {
        /// The URL.
        url: String,
    },
    /// A master monitored by Redis Sentinel.
    Sentinel {
        /// One `redis://` / `rediss://` URL per sentinel (with the sentinel credentials).
        sentinels: Vec<String>,
        /// The name the sentinels monitor the master under.
        master_name: String,
        /// Database, user and password used on the master.
        master: RedisConnectionInfo,
        /// TLS towards the master (`rediss+sentinel://`).
        tls: bool,
    },
    /// A Redis Cluster.
    Cluster {
        /// One `redis://` / `rediss://` URL per seed node (with the credentials).
        nodes: Vec<String>,
    },
}

impl fmt::Debug for RedisTopology {
    /// Never shows credentials: only the kind and the addresses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTopology::Single { .. } => f.write_str("Single(<url redacted>)"),
            RedisTopology::Sentinel { sentinels, master_name, tls, .. } => f
                .debug_struct("Sentinel")
                .field("sentinels", &sentinels.iter().map(|u| host_of(u)).collect::<Vec<_>>())
                .field("master_name", master_name)
                .field("tls", tls)
                .finish_non_exhaustive(),
            RedisTopology::Cluster { nodes } => {
                f.debug_struct("Cluster").field("nodes", &nodes.iter().map(|u| host_of(u)).collect::<Vec<_>>()).finish()
            }
        }
    }
}

/// `host:port` of a URL built by [`node_url`] (everything after the last `@`).
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.rsplit_once('@').map_or(rest, |(_, h)| h)
}

impl RedisTopology {
    /// Parses a `--store` Redis URL (see the module documentation).
    ///
    /// # Errors
    /// A message naming what is wrong (never the password).
    pub fn parse(url: &str) -> Result<RedisTopology, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err("expected a URL: redis://, rediss://, redis+sentinel:// or redis+cluster://".into());
        };
        let (node_scheme, kind) = match scheme {
            "redis" => ("redis", Kind::Single),
            "rediss" => ("rediss", Kind::Single),
            "redis+sentinel" => ("redis", Kind::Sentinel),
            "rediss+sentinel" => ("rediss", Kind::Sentinel),
            "redis+cluster" => ("redis", Kind::Cluster),
            "rediss+cluster" => ("rediss", Kind::Cluster),
            _ => {
                return Err(format!(
                    "unknown scheme `{scheme}://`: expected redis://, rediss://, redis+sentinel://, \
                     rediss+sentinel://, redis+cluster:// or rediss+cluster://"
                ));
            }
        };
        if node_scheme == "rediss" && !cfg!(feature = "tls") {
            return Err(format!("{scheme}:// needs TLS support: build mcp-affinity-control with `--features tls`"));
        }
        if kind == Kind::Single {
            url.into_connection_info().map_err(|e| format!("invalid Redis URL: {e}"))?;
            return Ok(RedisTopology::Single { url: url.to_string() });
        }
        let parts = Parts::split(rest)?;
        match kind {
            Kind::Single => unreachable!("handled above"),
            Kind::Sentinel => parse_sentinel(node_scheme, &parts),
            Kind::Cluster => parse_cluster(node_scheme, &parts),
        }
    }

    /// `single`, `sentinel` or `cluster` (for logs).
    pub fn kind(&self) -> &'static str {
        match self {
            RedisTopology::Single { .. } => "single",
            RedisTopology::Sentinel { .. } => "sentinel",
            RedisTopology::Cluster { .. } => "cluster",
        }
    }

    /// Whether the servers are reached over TLS.
    pub fn uses_tls(&self) -> bool {
        match self {
            RedisTopology::Single { url } => url.starts_with("rediss://"),
            RedisTopology::Sentinel { tls, .. } => *tls,
            RedisTopology::Cluster { nodes } => nodes.iter().any(|n| n.starts_with("rediss://")),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Single,
    Sentinel,
    Cluster,
}

/// `[userinfo@]hosts[/path][?query]`, still percent-encoded.
struct Parts<'a> {
    userinfo: Option<&'a str>,
    hosts: Vec<&'a str>,
    path: Vec<&'a str>,
    query: Vec<(&'a str, &'a str)>,
}

impl<'a> Parts<'a> {
    fn split(rest: &'a str) -> Result<Parts<'a>, String> {
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err("a fragment (`#…`) is not allowed; percent-encode `#` in passwords as %23".into());
        }
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if userinfo.is_some_and(|u| u.contains('@')) {
            return Err("percent-encode `@` in the user name or password as %40".into());
        }
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err("expected a comma-separated list of host[:port], without empty entries".into());
        }
        let path = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut params = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((k, v));
        }
        Ok(Parts { userinfo, hosts, path, query: params })
    }
}

/// `host[:port]` with the default port filled in; IPv6 literals in brackets.
fn host_port(host: &str, default_port: u16) -> Result<String, String> {
    let bad = || format!("`{host}` is not host[:port] (IPv6 in brackets: [::1]:6379)");
    let (name, port) = if let Some(inner) = host.strip_prefix('[') {
        match inner.split_once(']') {
            Some((ip, "")) => (format!("[{ip}]"), None),
            Some((ip, tail)) => match tail.strip_prefix(':') {
                Some(p) => (format!("[{ip}]"), Some(p)),
                None => return Err(bad()),
            },
            None => return Err(bad()),
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n.to_string(), Some(p)),
            None => (host.to_string(), None),
        }
    };
    if name.is_empty() || (name.contains(':') && !name.starts_with('[')) {
        return Err(bad());
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
    };
    Ok(format!("{name}:{port}"))
}

/// `scheme://[userinfo@]host:port`, checked by the redis crate's own URL parser.
fn node_url(scheme: &str, userinfo: Option<&str>, host_port: &str) -> Result<String, String> {
    let url = match userinfo {
        Some(u) => format!("{scheme}://{u}@{host_port}"),
        None => format!("{scheme}://{host_port}"),
    };
    url.as_str().into_connection_info().map_err(|e| format!("invalid node `{host_port}`: {e}"))?;
    Ok(url)
}

fn parse_sentinel(scheme: &str, parts: &Parts<'_>) -> Result<RedisTopology, String> {
    const SHAPE: &str = "redis+sentinel://[user:pass@]host[:port][,host[:port]...]/MASTERNAME[/db]";
    let master_name = match parts.path.first() {
        Some(name) => name.to_string(),
        None => return Err(format!("the master name is missing: expected {SHAPE}")),
    };
    let db: i64 = match parts.path.get(1) {
        None => 0,
        Some(db) => db.parse().ok().filter(|d| *d >= 0).ok_or_else(|| format!("database `{db}` is not a number ≥ 0"))?,
    };
    if parts.path.len() > 2 {
        return Err(format!("too many path segments: expected {SHAPE}"));
    }
    let (mut sentinel_user, mut sentinel_pass) = (None, None);
    for (key, value) in &parts.query {
        match *key {
            "sentinel_username" => sentinel_user = Some(*value),
            "sentinel_password" => sentinel_pass = Some(*value),
            other => {
                return Err(format!("unknown parameter `{other}` (known: sentinel_username, sentinel_password)"));
            }
        }
    }
    let sentinel_userinfo = match (sentinel_user, sentinel_pass) {
        (None, None) => None,
        (user, pass) => Some(format!("{}:{}", user.unwrap_or(""), pass.unwrap_or(""))),
    };
    let sentinels = parts
        .hosts
        .iter()
        .map(|h| node_url(scheme, sentinel_userinfo.as_deref(), &host_port(h, DEFAULT_SENTINEL_PORT)?))
        .collect::<Result<Vec<_>, _>>()?;
    // The crate decodes user and password of a URL: let it do so for the master's too.
    let template = match parts.userinfo {
        Some(u) => format!("redis://{u}@localhost/{db}"),
        None => format!("redis://localhost/{db}"),
    };
    let master = template
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("invalid user or password: {e}"))?
        .redis_settings()
        .clone();
    Ok(RedisTopology::Sentinel { sentinels, master_name, master, tls: scheme == "rediss" })
}

fn parse_cluster(scheme: &str, parts: &Parts<'_>) -> Result<RedisTopology, String> {
    match parts.path.as_slice() {
        [] | ["0"] => {}
        _ => return Err("a Redis Cluster has only database 0: expected redis+cluster://[user:pass@]host[:port][,host[:port]...]".into()),
    }
    if let Some((key, _)) = parts.query.first() {
        return Err(format!("unknown parameter `{key}` (redis+cluster:// takes none)"));
    }
    let nodes = parts
        .hosts
        .iter()
        .map(|h| node_url(scheme, parts.userinfo, &host_port(h, DEFAULT_REDIS_PORT)?))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RedisTopology::Cluster { nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> (Vec<String>, String, RedisConnectionInfo, bool) {
        match RedisTopology::parse(url).unwrap() {
            RedisTopology::Sentinel { sentinels, master_name, master, tls } => (sentinels, master_name, master, tls),
            other => panic!("{other:?}"),
        }
    }

    fn cluster(url: &str) -> Vec<String> {
        match RedisTopology::parse(url).unwrap() {
            RedisTopology::Cluster { nodes } => nodes,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn single_node_urls_pass_through() {
        for url in ["redis://127.0.0.1:6379", "redis://:pw@h:1/3"] {
            match RedisTopology::parse(url).unwrap() {
                RedisTopology::Single { url: u } => assert_eq!(u, url),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(RedisTopology::parse("redis://h").unwrap().kind(), "single");
        assert!(!RedisTopology::parse("redis://h").unwrap().uses_tls());
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_needs_the_feature() {
        for url in ["rediss://h:6380/0", "rediss+sentinel://h/m", "rediss+cluster://h:1"] {
            let err = RedisTopology::parse(url).unwrap_err();
            assert!(err.contains("--features tls"), "{url}: {err}");
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_urls() {
        assert!(RedisTopology::parse("rediss://h:6380/0").unwrap().uses_tls());
        assert!(RedisTopology::parse("rediss+cluster://a:1").unwrap().uses_tls());
        let (s, _, _, tls) = sentinel("rediss+sentinel://h1:1/m");
        assert_eq!((s, tls), (vec!["rediss://h1:1".to_string()], true));
    }

    #[test]
    fn sentinel_urls() {
        let (s, name, master, tls) = sentinel("redis+sentinel://10.0.0.1:26380,10.0.0.2,[::1]:5/mymaster");
        assert_eq!(s, ["redis://10.0.0.1:26380", "redis://10.0.0.2:26379", "redis://[::1]:5"]);
        assert_eq!((name.as_str(), master.db(), master.password(), tls), ("mymaster", 0, None, false));

        let (s, name, master, tls) =
            sentinel("redis+sentinel://app:p%40ss%2Fw@h1:1,h2:2/cache/4?sentinel_username=sen&sentinel_password=s%3Ap");
        assert_eq!(s, ["redis://sen:s%3Ap@h1:1", "redis://sen:s%3Ap@h2:2"]);
        assert_eq!(name, "cache");
        assert_eq!((master.db(), master.username(), master.password(), tls), (4, Some("app"), Some("p@ss/w"), false));

        let (s, _, master, _) = sentinel("redis+sentinel://:secret@h/m?sentinel_password=x");
        assert_eq!(s, ["redis://:x@h:26379"]);
        assert_eq!((master.username(), master.password()), (None, Some("secret")));
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(cluster("redis+cluster://a:7000,b:7001,c"), ["redis://a:7000", "redis://b:7001", "redis://c:6379"]);
        assert_eq!(cluster("redis+cluster://u:p@a:1/"), ["redis://u:p@a:1"]);
        assert_eq!(cluster("redis+cluster://a:1/0"), ["redis://a:1"]);
    }

    #[test]
    fn clear_errors() {
        let err = |url: &str| RedisTopology::parse(url).unwrap_err();
        assert!(err("redis+sentinel://h1,h2").contains("master name is missing"), "{}", err("redis+sentinel://h1,h2"));
        assert!(err("redis+sentinel://h1/m/x").contains("database `x`"));
        assert!(err("redis+sentinel://h1/m/1/2").contains("too many path segments"));
        assert!(err("redis+sentinel://h1/m?password=x").contains("unknown parameter `password`"));
        assert!(err("redis+sentinel://h1,,h2/m").contains("without empty entries"));
        assert!(err("redis+sentinel://h:0/m").contains("not host[:port]"));
        assert!(err("redis+sentinel://h:99999/m").contains("not host[:port]"));
        assert!(err("redis+cluster://a:1/3").contains("only database 0"));
        assert!(err("redis+cluster://a:1?x=1").contains("unknown parameter `x`"));
        assert!(err("redis+cluster://u:p@w@a:1").contains("%40"));
        assert!(err("memcached://x").contains("unknown scheme"));
        assert!(err("redis:/x").contains("expected a URL"));
        // The password never appears in an error.
        for url in ["redis+sentinel://u:hunter2@h1", "redis+cluster://u:hunter2@a:1/9", "redis+cluster://u:hunter2@a:x"] {
            assert!(!err(url).contains("hunter2"), "{}", err(url));
        }
    }

    #[test]
    fn debug_redacts_credentials() {
        let t = RedisTopology::parse("redis+sentinel://u:hunter2@h1:1/m?sentinel_password=hunter3").unwrap();
        let shown = format!("{t:?}");
        assert!(shown.contains("h1:1") && !shown.contains("hunter"), "{shown}");
        let t = RedisTopology::parse("redis+cluster://u:hunter2@a:1").unwrap();
        assert!(!format!("{t:?}").contains("hunter"));
        assert!(!format!("{:?}", RedisTopology::parse("redis://:hunter2@h").unwrap()).contains("hunter"));
    }
}
