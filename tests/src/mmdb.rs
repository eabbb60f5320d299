//! A small GeoIP database in the MaxMind DB format, made by the tests
//! themselves: IPv4 networks, each with a city record's coordinates. The
//! operator reads it as it reads GeoLite2-City.
//!
//! The format (https://maxmind.github.io/MaxMind-DB/): a binary search tree
//! over the address bits, 16 zero bytes, a data section of records, then a
//! marker and the metadata map.

use std::net::Ipv4Addr;

/// One network and where it is.
#[derive(Clone, Copy, Debug)]
pub struct Network {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub latitude: f64,
    pub longitude: f64,
}

#[derive(Clone, Copy)]
enum Record {
    Empty,
    Node(u32),
    Data(u32),
}

/// The database's bytes, for networks that do not overlap.
pub fn city_database(networks: &[Network]) -> Vec<u8> {
    let mut nodes: Vec<[Record; 2]> = vec![[Record::Empty, Record::Empty]];
    let mut data = Vec::new();
    for network in networks {
        let offset = data.len() as u32;
        data.extend(city(network.latitude, network.longitude));
        let bits = u32::from(network.address);
        let mut node = 0usize;
        for depth in 0..network.prefix {
            let bit = ((bits >> (31 - depth)) & 1) as usize;
            if depth + 1 == network.prefix {
                nodes[node][bit] = Record::Data(offset);
                break;
            }
            node = match nodes[node][bit] {
                Record::Node(next) => next as usize,
                _ => {
                    nodes.push([Record::Empty, Record::Empty]);
                    let next = nodes.len() - 1;
                    nodes[node][bit] = Record::Node(next as u32);
                    next
                }
            };
        }
    }
    let node_count = nodes.len() as u32;
    let value = |record: Record| match record {
        Record::Empty => node_count,
        Record::Node(next) => next,
        // Past the node count and the 16-byte separator.
        Record::Data(offset) => node_count + 16 + offset,
    };
    // 24-bit records: each node is its two records, big-endian.
    let mut out = Vec::new();
    for [left, right] in nodes {
        out.extend_from_slice(&value(left).to_be_bytes()[1..]);
        out.extend_from_slice(&value(right).to_be_bytes()[1..]);
    }
    out.extend_from_slice(&[0; 16]);
    out.extend(data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    out.extend(metadata(node_count));
    out
}

/// `{"location": {"latitude": .., "longitude": ..}}`.
fn city(latitude: f64, longitude: f64) -> Vec<u8> {
    let mut out = map(1);
    out.extend(string("location"));
    out.extend(map(2));
    out.extend(string("latitude"));
    out.extend(double(latitude));
    out.extend(string("longitude"));
    out.extend(double(longitude));
    out
}

fn metadata(node_count: u32) -> Vec<u8> {
    let mut out = map(9);
    out.extend(string("binary_format_major_version"));
    out.extend(unsigned(5, 2));
    out.extend(string("binary_format_minor_version"));
    out.extend(unsigned(5, 0));
    out.extend(string("build_epoch"));
    out.extend(extended(9, &[1]));
    out.extend(string("database_type"));
    out.extend(string("Tidepool-Test-City"));
    out.extend(string("description"));
    out.extend(map(1));
    out.extend(string("en"));
    out.extend(string("Tidepool's test networks"));
    out.extend(string("ip_version"));
    out.extend(unsigned(5, 4));
    out.extend(string("languages"));
    let mut languages = extended(11, &[]);
    languages.extend(string("en"));
    // The array's size (1) is in its control byte.
    languages[0] |= 1;
    out.extend(languages);
    out.extend(string("node_count"));
    out.extend(unsigned(6, node_count.into()));
    out.extend(string("record_size"));
    out.extend(unsigned(5, 24));
    out
}

/// A control byte of `kind` (1 to 7) and `size` (under 29).
fn control(kind: u8, size: usize) -> u8 {
    assert!(size < 29, "sizes past 28 need size bytes, which these records never do");
    (kind << 5) | size as u8
}

fn map(pairs: usize) -> Vec<u8> {
    vec![control(7, pairs)]
}

fn string(text: &str) -> Vec<u8> {
    let mut out = vec![control(2, text.len())];
    out.extend_from_slice(text.as_bytes());
    out
}

fn double(value: f64) -> Vec<u8> {
    let mut out = vec![control(3, 8)];
    out.extend_from_slice(&value.to_be_bytes());
    out
}

/// An unsigned integer of `kind` (5: uint16, 6: uint32) in as few bytes as it needs.
fn unsigned(kind: u8, value: u64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(8);
    let mut out = vec![control(kind, 8 - first)];
    out.extend_from_slice(&bytes[first..]);
    out
}

/// An extended type (8 and up): type bits 0, then the type less 7.
fn extended(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![payload.len() as u8, kind - 7];
    out.extend_from_slice(payload);
    out
}
