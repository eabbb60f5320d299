//! Prints a fresh pool key and a session's credentials for one pod, as
//! shell exports: enough to run `tidepool-session` by hand and talk to it.
//!
//! ```sh
//! eval "$(cargo run -q -p tidepool-session --example credentials -- my-pod)"
//! tidepool-session --pod-name my-pod &
//! curl -H "Authorization: Bearer $TOKEN" -H "x-tidepool-binding: $TICKET" localhost:8080/api/v1/info
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use tidepool_wire::token::{PoolSigningKey, SessionClaims};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pod = std::env::args().nth(1).unwrap_or_else(|| "session-pod".into());
    let key = PoolSigningKey::generate()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = SessionClaims {
        sid: "local-session".into(),
        ns: "default".into(),
        name: "local".into(),
        pool: "local".into(),
        profile: "speed".into(),
        exp: now + 24 * 3600,
        probes: None,
        tier: 1,
        thresholds: None,
        kid: String::new(),
    };
    println!("export TIDEPOOL_POOL_PUBLIC_KEY={}", key.public().to_base64());
    println!("export TIDEPOOL_POD_NAME={pod}");
    println!("export TOKEN={}", key.sign_session(&claims));
    println!("export TICKET={}", key.sign_binding(&claims.sid, &pod));
    Ok(())
}
