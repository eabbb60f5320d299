//! Where things are: a node's region and coordinates from its labels, and a
//! client's coordinates from a GeoIP database in the MaxMind DB format.
//!
//! Placement weighs distance only between a client and a backend that both
//! have coordinates; everything here only fills in what is missing.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use tidepool_wire::report::Coordinates;

/// The well-known label of a node's region (set by cloud providers).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Explicit coordinates of a node, as labels or annotations; they win over
/// its region's. A label value may not begin with `-`, so south and west
/// are written with a hemisphere instead of a sign (`33.87S`, `151.21E`);
/// an annotation may use either.
pub const LATITUDE_LABEL: &str = "tidepool.dev/latitude";
pub const LONGITUDE_LABEL: &str = "tidepool.dev/longitude";

/// Coordinates of regions by name, from `--region-coordinates NAME=LAT,LON`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegionTable(HashMap<String, Coordinates>);

impl RegionTable {
    /// From `NAME=LAT,LON` entries; the first malformed one is the error.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut table = HashMap::new();
        for entry in entries {
            let (name, place) =
                entry.split_once('=').ok_or_else(|| format!("{entry:?}: expected NAME=LATITUDE,LONGITUDE"))?;
            if name.is_empty() || name.len() > 63 {
                return Err(format!("{entry:?}: a region name is 1 to 63 characters"));
            }
            let (latitude, longitude) =
                place.split_once(',').ok_or_else(|| format!("{entry:?}: expected NAME=LATITUDE,LONGITUDE"))?;
            let coordinates = coordinates(latitude.trim(), longitude.trim())
                .ok_or_else(|| format!("{entry:?}: latitude -90 to 90 and longitude -180 to 180, in degrees"))?;
            table.insert(name.to_owned(), coordinates);
        }
        Ok(Self(table))
    }

    pub fn get(&self, region: &str) -> Option<Coordinates> {
        self.0.get(region).copied()
    }
}

/// Degrees, when both parse and are in range.
fn coordinates(latitude: &str, longitude: &str) -> Option<Coordinates> {
    in_range(latitude.parse().ok()?, longitude.parse().ok()?)
}

/// Degrees from `48.86`, `-33.87` or `33.87S`: a trailing `north` or `south`
/// letter (for a latitude; `east` or `west` for a longitude) gives the sign.
fn degrees(text: &str, positive: char, negative: char) -> Option<f64> {
    let text = text.trim();
    let last = text.chars().last()?.to_ascii_uppercase();
    let (number, sign) = match last {
        l if l == positive => (&text[..text.len() - 1], 1.0),
        l if l == negative => (&text[..text.len() - 1], -1.0),
        _ => (text, 1.0),
    };
    let value: f64 = number.parse().ok()?;
    // A hemisphere and a sign together would say it twice.
    if sign < 0.0 && value < 0.0 {
        return None;
    }
    Some(sign * value)
}

fn in_range(latitude: f64, longitude: f64) -> Option<Coordinates> {
    let valid = (-90.0..=90.0).contains(&latitude) && (-180.0..=180.0).contains(&longitude);
    valid.then_some(Coordinates { latitude, longitude })
}

/// A node's place as its labels tell it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Place {
    pub region: Option<String>,
    pub coordinates: Option<Coordinates>,
}

/// The region label, and coordinates from the explicit annotations or
/// labels (annotations first) or else from the region's entry in `table`.
/// Values that do not parse, or lie out of range, are as good as absent.
pub fn node_place(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    table: &RegionTable,
) -> Place {
    let region = labels.get(REGION_LABEL).filter(|r| !r.is_empty()).cloned();
    let explicit = |marks: &BTreeMap<String, String>| {
        let latitude = degrees(marks.get(LATITUDE_LABEL)?, 'N', 'S')?;
        let longitude = degrees(marks.get(LONGITUDE_LABEL)?, 'E', 'W')?;
        in_range(latitude, longitude)
    };
    let coordinates = explicit(annotations).or_else(|| explicit(labels)).or_else(|| table.get(region.as_deref()?));
    Place { region, coordinates }
}

/// A GeoIP database, read once into memory.
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// The part of a City record placement needs.
#[derive(Deserialize)]
struct CityRecord {
    location: Option<Location>,
}

#[derive(Deserialize)]
struct Location {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl GeoIp {
    /// Opens the database at `path` (GeoLite2-City or any database whose
    /// records carry `location.latitude` and `location.longitude`).
    pub fn open(path: &Path) -> Result<Self, String> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { reader })
    }

    /// Where `address` is, when the database knows it with coordinates.
    pub fn locate(&self, address: IpAddr) -> Option<Coordinates> {
        // An address the database does not hold is an error here, as is a broken record.
        let record: CityRecord = self.reader.lookup(address).ok()?;
        let location = record.location?;
        in_range(location.latitude?, location.longitude?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn table() -> RegionTable {
        RegionTable::parse(&["eu-west=48.86,2.35".into(), "us-east=40.71, -74.0".into()]).unwrap()
    }

    #[test]
    fn the_region_table_parses_and_refuses_what_is_not_a_place() {
        let table = table();
        assert_eq!(table.get("eu-west"), Some(Coordinates { latitude: 48.86, longitude: 2.35 }));
        assert_eq!(table.get("us-east"), Some(Coordinates { latitude: 40.71, longitude: -74.0 }));
        assert_eq!(table.get("mars"), None);
        for bad in ["eu-west", "=1,2", "eu=1", "eu=91,0", "eu=0,181", "eu=a,b", "eu=NaN,0"] {
            assert!(RegionTable::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert_eq!(RegionTable::parse(&[]), Ok(RegionTable::default()));
    }

    fn node_place(labels: &BTreeMap<String, String>, table: &RegionTable) -> Place {
        super::node_place(labels, &BTreeMap::new(), table)
    }

    #[test]
    fn degrees_take_a_sign_or_a_hemisphere() {
        assert_eq!(degrees("48.86", 'N', 'S'), Some(48.86));
        assert_eq!(degrees("33.87S", 'N', 'S'), Some(-33.87));
        assert_eq!(degrees("33.87s", 'N', 'S'), Some(-33.87));
        assert_eq!(degrees("151.21E", 'E', 'W'), Some(151.21));
        assert_eq!(degrees("74.0W", 'E', 'W'), Some(-74.0));
        assert_eq!(degrees("-74.0", 'E', 'W'), Some(-74.0));
        for bad in ["", "S", "-33.87S", "33.87E", "north", "1.2.3"] {
            assert_eq!(degrees(bad, 'N', 'S'), None, "{bad}");
        }
    }

    #[test]
    fn annotations_win_over_labels() {
        let table = table();
        let labelled = labels(&[(LATITUDE_LABEL, "33.87S"), (LONGITUDE_LABEL, "151.21E")]);
        let annotated = labels(&[(LATITUDE_LABEL, "-37.81"), (LONGITUDE_LABEL, "144.96")]);
        let melbourne = Some(Coordinates { latitude: -37.81, longitude: 144.96 });
        assert_eq!(super::node_place(&labelled, &annotated, &table).coordinates, melbourne);
        let sydney = Some(Coordinates { latitude: -33.87, longitude: 151.21 });
        assert_eq!(super::node_place(&labelled, &BTreeMap::new(), &table).coordinates, sydney);
    }

    #[test]
    fn a_node_is_where_its_labels_say() {
        let table = table();
        // The region's coordinates from the table.
        let place = node_place(&labels(&[(REGION_LABEL, "eu-west")]), &table);
        assert_eq!(place.region.as_deref(), Some("eu-west"));
        assert_eq!(place.coordinates, table.get("eu-west"));
        // Explicit coordinates win over the region's.
        let explicit = [(REGION_LABEL, "eu-west"), (LATITUDE_LABEL, "-33.87"), (LONGITUDE_LABEL, "151.21")];
        let place = node_place(&labels(&explicit), &table);
        assert_eq!(place.coordinates, Some(Coordinates { latitude: -33.87, longitude: 151.21 }));
        // A region the table does not know: its name, no coordinates.
        let place = node_place(&labels(&[(REGION_LABEL, "mars-1")]), &table);
        assert_eq!((place.region.as_deref(), place.coordinates), (Some("mars-1"), None));
        // Labels that do not parse are as good as absent.
        let bad = [(REGION_LABEL, "us-east"), (LATITUDE_LABEL, "north"), (LONGITUDE_LABEL, "1")];
        assert_eq!(node_place(&labels(&bad), &table).coordinates, table.get("us-east"));
        let half = [(LATITUDE_LABEL, "10")];
        assert_eq!(node_place(&labels(&half), &table), Place::default());
        assert_eq!(node_place(&BTreeMap::new(), &table), Place::default());
    }
}
