//! The labels and annotations Tidepool puts on the objects it manages.

/// On every pod of a pool: the pool's name.
pub const POOL: &str = "tidepool.dev/pool";
/// On every pod of a pool: `warm` or `assigned`.
pub const STATE: &str = "tidepool.dev/state";
pub const STATE_WARM: &str = "warm";
pub const STATE_ASSIGNED: &str = "assigned";
/// On an assigned pod: the session's name (a label, so it can be selected).
pub const SESSION: &str = "tidepool.dev/session";
/// On an assigned pod: the session's UID. This is the binding's durable record.
pub const SESSION_UID: &str = "tidepool.dev/session-uid";
/// On every pod of a pool: the hash of the template it was made from.
pub const TEMPLATE_HASH: &str = "tidepool.dev/template-hash";
/// On every pod of a pool: the id of the pool key it was given.
pub const KEY_ID: &str = "tidepool.dev/key-id";
/// On every session a Monitor makes: the monitor's name.
pub const MONITOR: &str = "tidepool.dev/monitor";
/// On the session a Tube on a pool makes: the tube's name (its first 63 characters).
pub const TUBE: &str = "tidepool.dev/tube";
/// The field manager of every write the operator makes.
pub const MANAGER: &str = "tidepool-operator";
